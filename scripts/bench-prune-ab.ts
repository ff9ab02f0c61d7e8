// Paired A/B timing of two packed models (e.g. before and after `sparsellm prune --drop-dead`):
// both are loaded in one process, and each round times a prefill of the same prompt and a short
// decode on A then on B (alternating which goes first), so machine load hits both alike. Prints
// the median time of each and the median of the per-round ratios.
//
// The prompt is the start of --text (tokenized by A's tokenizer), so that a model pruned on that
// kind of text computes the same thing as the original; without --text, seeded random ids.
//
//   flock /tmp/sparsellm-bench.lock npx tsx scripts/bench-prune-ab.ts A.sllm B.sllm [--text file] [--prefill 256] [--decode 32] [--rounds 7]
import { readFileSync } from 'node:fs';
import { ModelRuntime } from '../src/core/model/runtime.js';

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
}

const textAt = process.argv.indexOf('--text');
const textFile = textAt > 0 ? process.argv[textAt + 1] : undefined;
const [a, b] = process.argv.slice(2).filter((s) => !s.startsWith('--') && !/^\d+$/.test(s) && s !== textFile);
if (!a || !b) throw new Error('usage: bench-prune-ab.ts A.sllm B.sllm [--prefill N] [--decode N] [--rounds N]');
const prefill = arg('prefill', 256);
const decode = arg('decode', 32);
const rounds = arg('rounds', 7);
const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;

const models = [await ModelRuntime.load(a, { context: prefill + decode + 1 }), await ModelRuntime.load(b, { context: prefill + decode + 1 })];
const vocab = Math.min(...models.map((m) => m.spec.vocabSize));
let seed = 12345;
const prompt = textFile
  ? models[0]!.tokenizer!.encode(readFileSync(textFile, 'utf8')).slice(0, prefill)
  : Array.from({ length: prefill }, () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) % vocab);
if (prompt.length < prefill) throw new Error(`--text gives only ${prompt.length} tokens`);

function time(m: ModelRuntime): { prefill: number; decode: number } {
  m.reset();
  const t0 = performance.now();
  let logits = m.forward(prompt, { mode: 'auto' });
  const t1 = performance.now();
  for (let i = 0; i < decode; i++) {
    let best = 0;
    for (let v = 1; v < vocab; v++) if (logits[v]! > logits[best]!) best = v;
    logits = m.forward([best], { mode: 'auto' });
  }
  const t2 = performance.now();
  return { prefill: (t1 - t0) / 1000, decode: (t2 - t1) / 1000 };
}

for (const m of models) time(m); // warm-up
const res: { prefill: number; decode: number }[][] = [[], []];
for (let r = 0; r < rounds; r++) {
  const order = r % 2 === 0 ? [0, 1] : [1, 0];
  for (const k of order) res[k]!.push(time(models[k]!));
}
const out = {
  a,
  b,
  prompt: textFile ?? 'random ids',
  prefillTokens: prefill,
  decodeTokens: decode,
  rounds,
  dFF: models.map((m) => m.spec.dFF),
  prefillSeconds: res.map((r) => median(r.map((x) => x.prefill))),
  decodeSeconds: res.map((r) => median(r.map((x) => x.decode))),
  // B's speedup over A per round (A time / B time), median.
  prefillSpeedup: median(res[0]!.map((x, i) => x.prefill / res[1]![i]!.prefill)),
  decodeSpeedup: median(res[0]!.map((x, i) => x.decode / res[1]![i]!.decode)),
  activity: models.map((m) => m.activity().map((l) => ({ layer: l.layer, dFF: l.dFF, nnzMean: l.nnzMean, sparseCalls: l.sparseCalls, denseCalls: l.denseCalls }))),
};
console.log(JSON.stringify(out, null, 2));
for (const m of models) m.close();
