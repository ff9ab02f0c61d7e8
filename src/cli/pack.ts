// `sparsellm pack <checkpoint> -o <model.sllm>`: dense checkpoint → packed model (docs/format.md).
import { unlink } from 'node:fs/promises';
import { Option, type Command } from 'commander';
import { openCheckpoint } from '../core/checkpoint/index.js';
import { SparseLlmError } from '../core/errors.js';
import {
  checkOutputPath,
  openPacked,
  packInputFromCheckpoint,
  verifyPacked,
  writePacked,
  type StorageDType,
  type VerifyResult,
} from '../core/format/index.js';
import { Output, formatBytes, formatDuration, type Progress } from './ui.js';
import { VERSION } from './version.js';

interface PackOptions {
  output: string;
  dtype: 'bf16' | 'f16' | 'f32';
  force?: boolean;
  verify?: boolean;
  json?: boolean;
  quiet?: boolean;
}

export function registerPack(program: Command): void {
  program
    .command('pack')
    .description('convert a dense checkpoint into a packed .sllm model (FFN weights in kernel layout)')
    .argument('<checkpoint>', 'Hugging Face checkpoint: a directory, a .safetensors file with config.json beside it, or a shard index')
    .requiredOption('-o, --output <file>', 'the packed model to write (e.g. model.sllm)')
    .addOption(new Option('--dtype <dtype>', 'storage dtype of the weight matrices').choices(['bf16', 'f16', 'f32']).default('bf16'))
    .option('--force', 'overwrite the output file if it exists')
    .option('--verify', 're-read the output and compare every tensor with the source')
    .option('--json', 'print a JSON summary on stdout (human text goes to stderr)')
    .option('-q, --quiet', 'no progress or human text')
    .action(async (checkpoint: string, opts: PackOptions) => runPack(checkpoint, opts));
}

async function runPack(checkpointPath: string, opts: PackOptions): Promise<void> {
  const out = new Output(opts);
  const dtype = opts.dtype.toUpperCase() as StorageDType;
  const started = performance.now();
  await checkOutputPath(opts.output, !!opts.force);
  const ckpt = await openCheckpoint(checkpointPath);
  try {
    const spec = ckpt.spec;
    const input = await packInputFromCheckpoint(ckpt);
    let bar: Progress | undefined;
    let result;
    try {
      result = await writePacked(input, opts.output, {
        dtype,
        force: !!opts.force,
        toolVersion: VERSION,
        onStart: (total) => {
          bar = out.progress(`packing ${spec.modelType} (${spec.nLayers} layers) → ${dtype}`, total, 'bytes');
        },
        onProgress: (n) => bar?.tick(n),
      });
    } catch (e) {
      bar?.fail();
      throw e;
    }
    const packSeconds = (performance.now() - started) / 1000;
    bar?.finish(`packed ${formatBytes(result.bytesOut)} in ${formatDuration(packSeconds)} (${formatBytes(result.bytesOut / Math.max(packSeconds, 1e-9))}/s)`);

    let verify: VerifyResult | undefined;
    if (opts.verify) {
      const packed = await openPacked(opts.output);
      try {
        const total = packed.tensorNames().reduce((a, n) => a + packed.tensor(n).bytes, 0) + (packed.fileSize - packed.dataStart);
        const vbar = out.progress('verifying', total, 'bytes');
        verify = await verifyPacked(packed, ckpt, (n) => vbar.tick(n));
        if (verify.ok) vbar.finish(`verified ${verify.tensors} tensors (${verify.elements} elements) and the content hash`);
        else vbar.fail();
      } finally {
        await packed.close();
      }
      if (!verify.ok) {
        await unlink(opts.output).catch(() => undefined);
        const ex = verify.examples[0];
        const what = verify.mismatches > 0
          ? `${verify.mismatches} elements differ from the source (first: ${ex!.tensor}[${ex!.index}] expected ${ex!.expected}, found ${ex!.actual})`
          : `content hash mismatch (header ${verify.contentHash.expected}, data ${verify.contentHash.actual})`;
        throw new SparseLlmError(`${opts.output}: verification failed: ${what}; the output was removed`);
      }
    }
    const seconds = (performance.now() - started) / 1000;
    const summary = {
      output: opts.output,
      checkpoint: ckpt.path,
      architecture: spec.modelType,
      family: spec.family,
      layers: spec.nLayers,
      dModel: spec.dModel,
      dFF: spec.dFF,
      tensors: result.tensors,
      dtype,
      bytesIn: result.bytesIn,
      bytesOut: result.bytesOut,
      seconds: Number(seconds.toFixed(3)),
      contentHash: result.contentHash,
      verify: verify
        ? { ok: verify.ok, tensors: verify.tensors, elements: verify.elements, mismatches: verify.mismatches, contentHash: verify.contentHash.ok }
        : null,
    };
    out.result(summary);
    out.say(
      `${opts.output}: ${spec.modelType}, ${spec.nLayers} layers, ${result.tensors} tensors, ${dtype}; ` +
        `${formatBytes(result.bytesIn)} in → ${formatBytes(result.bytesOut)} out in ${formatDuration(seconds)}` +
        (verify ? '; verified' : ''),
    );
  } finally {
    await ckpt.close();
  }
}
