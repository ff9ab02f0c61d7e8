// Packing benchmark: peak memory and throughput of `sparsellm pack` on a large synthetic
// Llama-shaped checkpoint, against the disk's own copy throughput measured in the same run.
//
//   npm run build:ts && flock /tmp/sparsellm-bench.lock npx tsx scripts/bench-pack-rss.ts [--gb 1.2] [--dir /tmp/sparsellm-bench-pack] [--cold] [--keep]
//       [--dtypes bf16,f16] [--verify] [--baseline /path/to/other/bin/sparsellm.js] [--repeat 1]
//
// 1. Writes (or reuses) a BF16 checkpoint of about --gb GB in --dir: d_model 2048, d_ff 5632,
//    vocab 32000, untied, as many layers as fit (config.json + model.safetensors; not committed).
// 2. Disk baseline: `cat model.safetensors > /dev/null` (read) and `dd bs=16M conv=fsync` of the
//    same file (read + write + fsync: the least work a converter that writes its output can do).
// 3. `/usr/bin/time -v node bin/sparsellm.js pack ... --dtype <d>` for each of --dtypes: wall time,
//    CPU time, peak RSS ("Maximum resident set size"); with --verify also `pack --verify` (bf16).
//    --baseline times another build's launcher the same way in the same run (e.g. a checkout of
//    an older commit with its dist/ built), so before/after ratios share the machine's load.
//    --repeat N runs the dd copy and every pack N times, interleaved, and keeps each one's best.
// --cold drops the page cache before each timed step (root only); otherwise the source is warm.
// Prints a Markdown table for docs/benchmarks.md and a JSON line.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeSyntheticLlama } from '../test/helpers/format-fixtures.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const flag = (name: string) => args.includes(name);
const value = (name: string, dflt: string) => {
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] ? args[i + 1]! : dflt;
};
const gb = Number(value('--gb', '1.2'));
const dir = value('--dir', '/tmp/sparsellm-bench-pack');
const cold = flag('--cold');
const dtypes = value('--dtypes', 'bf16,f16').split(',');
const baseline = value('--baseline', '');
const repeat = Math.max(1, Number(value('--repeat', '1')));
if (flag('--help')) {
  console.log('usage: npx tsx scripts/bench-pack-rss.ts [--gb 1.2] [--dir /tmp/sparsellm-bench-pack] [--cold] [--keep] [--dtypes bf16,f16] [--verify] [--baseline other/bin/sparsellm.js] [--repeat N]');
  process.exit(0);
}

const d = 2048;
const dFF = 5632;
const vocab = 32000;
const perLayer = (4 * d * d + 3 * d * dFF + 2 * d) * 2;
const nLayers = Math.max(1, Math.round((gb * 1e9 - 2 * vocab * d * 2) / perLayer));
const ckpt = join(dir, 'ckpt');
const out = join(dir, 'out.sllm');
const stamp = JSON.stringify({ d, dFF, vocab, nLayers, dtype: 'BF16' });

function dropCaches(): void {
  if (!cold) return;
  execFileSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '3');
}

function timed(cmd: string, argv: string[]): { wall: number; user: number; sys: number; rssKiB: number; stdout: string } {
  const r = spawnSync('/usr/bin/time', ['-v', cmd, ...argv], { encoding: 'utf8', maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`${cmd} ${argv.join(' ')} failed (${r.status}):\n${r.stderr}`);
  const num = (re: RegExp) => Number(re.exec(r.stderr)?.[1] ?? NaN);
  const el = /Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)/.exec(r.stderr)!;
  const wall = Number(el[1] ?? 0) * 3600 + Number(el[2]) * 60 + Number(el[3]);
  return { wall, user: num(/User time \(seconds\): ([\d.]+)/), sys: num(/System time \(seconds\): ([\d.]+)/), rssKiB: num(/Maximum resident set size \(kbytes\): (\d+)/), stdout: r.stdout };
}

async function main(): Promise<void> {
  mkdirSync(dir, { recursive: true });
  const stampFile = join(ckpt, '.bench-stamp');
  if (!existsSync(stampFile) || readFileSync(stampFile, 'utf8') !== stamp) {
    rmSync(ckpt, { recursive: true, force: true });
    process.stderr.write(`writing a ${nLayers}-layer synthetic checkpoint in ${ckpt} ...\n`);
    await writeSyntheticLlama(ckpt, { dModel: d, dFF, nLayers, vocab, dtype: 'BF16' });
    writeFileSync(stampFile, stamp);
  }
  const src = join(ckpt, 'model.safetensors');
  const size = statSync(src).size;
  const MB = (n: number) => n / 1e6;

  const loadBefore = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  dropCaches();
  const cat = timed('sh', ['-c', `cat '${src}' > /dev/null`]);
  type Timed = ReturnType<typeof timed>;
  const best = (a: Timed | undefined, b: Timed) => (!a || b.wall < a.wall ? b : a);
  let copy: Timed | undefined;
  const cases: { label: string; bin: string; argv: string[] }[] = [];
  const bins = baseline ? [{ tag: 'baseline ', bin: baseline }, { tag: '', bin: join(ROOT, 'bin', 'sparsellm.js') }] : [{ tag: '', bin: join(ROOT, 'bin', 'sparsellm.js') }];
  for (const { tag, bin } of bins) {
    for (const dtype of dtypes) cases.push({ label: `${tag}sparsellm pack --dtype ${dtype}`, bin, argv: ['--dtype', dtype] });
    if (flag('--verify')) cases.push({ label: `${tag}sparsellm pack --dtype bf16 --verify`, bin, argv: ['--dtype', 'bf16', '--verify'] });
  }
  const results = new Map<string, Timed & { bytesOut: number }>();
  for (let r = 0; r < repeat; r++) {
    dropCaches();
    copy = best(copy, timed('dd', [`if=${src}`, `of=${join(dir, 'copy.bin')}`, 'bs=16M', 'conv=fsync', 'status=none']));
    rmSync(join(dir, 'copy.bin'), { force: true });
    for (const c of cases) {
      rmSync(out, { force: true });
      dropCaches();
      const t = timed(process.execPath, [c.bin, 'pack', ckpt, '-o', out, ...c.argv, '--json', '--quiet']);
      const summary = JSON.parse(t.stdout);
      const prev = results.get(c.label);
      if (!prev || t.wall < prev.wall) results.set(c.label, { ...t, bytesOut: summary.bytesOut as number });
    }
  }
  if (!flag('--keep')) rmSync(out, { force: true });
  const runs = cases.map((c) => ({ label: c.label, ...results.get(c.label)! }));
  const copyT = copy!;

  const commit = execFileSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim();
  const load = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  const machine = `${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, node ${process.version}, load average ${loadBefore} before, ${load} after`;
  const rate = (wall: number) => MB(size) / wall;
  const lines = [
    `source: ${MB(size).toFixed(0)} MB BF16 safetensors (${nLayers} layers, d_model ${d}, d_ff ${dFF}, vocab ${vocab}); page cache ${cold ? 'dropped before each step' : 'warm'}; commit ${commit}; ${machine}${repeat > 1 ? `; best of ${repeat}` : ''}`,
    '',
    '| step | wall s | MB/s (source bytes) | × dd copy | CPU s (user+sys) | peak RSS MiB | RSS / source |',
    '|---|---|---|---|---|---|---|',
    `| cat source > /dev/null | ${cat.wall.toFixed(2)} | ${rate(cat.wall).toFixed(0)} | | ${(cat.user + cat.sys).toFixed(2)} | | |`,
    `| dd copy, conv=fsync | ${copyT.wall.toFixed(2)} | ${rate(copyT.wall).toFixed(0)} | 1.00 | ${(copyT.user + copyT.sys).toFixed(2)} | | |`,
    ...runs.map(
      (r) =>
        `| ${r.label} | ${r.wall.toFixed(2)} | ${rate(r.wall).toFixed(0)} | ${(copyT.wall / r.wall).toFixed(2)} | ${(r.user + r.sys).toFixed(2)} | ${(r.rssKiB / 1024).toFixed(0)} | ${((r.rssKiB * 1024 * 100) / size).toFixed(1)}% |`,
    ),
  ];
  console.log(lines.join('\n'));
  console.log(JSON.stringify({ size, nLayers, cold, commit, load: { before: loadBefore, after: load }, cat, copy: { wall: copyT.wall }, runs: runs.map(({ stdout: _s, ...r }) => r) }));
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
