// `sparsellm infer <model>`: generate text from a prompt (streamed to stdout), or measure
// perplexity over text files, on the CPU model runtime (TwELL kernels for ReLU FFNs).
import { readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Option, type Command } from 'commander';
import { SparseLlmError, UsageError } from '../core/errors.js';
import { setThreads } from '../core/native.js';
import { generate, perplexity } from '../core/model/generate.js';
import { ModelRuntime, resolveModelBackend, type FfnRunMode, type KvCacheDtype, type LayerActivity } from '../core/model/runtime.js';
import { StreamDecoder } from '../core/tokenizer/index.js';
import { kvCacheOption, parseNumberInRange, parsePositiveInt } from './options.js';
import { Output, formatBytes } from './ui.js';
import { DEFAULT_MODEL, DEFAULT_MODEL_NOTE } from './default-model.js';

interface InferOptions {
  prompt?: string;
  maxTokens: number;
  temperature: number;
  topK: number;
  topP: number;
  seed?: number;
  perplexity?: string;
  context?: number;
  dense?: boolean;
  mmap?: boolean;
  kvCache: KvCacheDtype;
  backend: 'auto' | 'cpu' | 'cuda';
  threads?: number;
  json?: boolean;
  quiet?: boolean;
}

function parseNonNegativeInt(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < 0) throw new UsageError(`${name} must be an integer >= 0, got '${value}'`);
    return n;
  };
}

export function registerInfer(program: Command): void {
  program
    .command('infer')
    .description('generate text from a prompt, or measure perplexity, with a packed model (or a dense checkpoint packed on the fly)')
    .argument('[model]', `a packed .sllm model, or a Hugging Face checkpoint directory / .safetensors file (default: ${DEFAULT_MODEL_NOTE})`)
    .option('-p, --prompt <text>', 'the prompt (default: read from stdin)')
    .option('-n, --max-tokens <n>', 'tokens to generate at most', parsePositiveInt('--max-tokens'), 128)
    .option('-t, --temperature <t>', 'sampling temperature; 0 = greedy', parseNumberInRange('--temperature', 0, 100), 0.8)
    .option('--top-k <k>', 'sample among the k most likely tokens (0 = all)', parseNonNegativeInt('--top-k'), 40)
    .option('--top-p <p>', 'sample among the most likely tokens whose probability reaches p', parseNumberInRange('--top-p', 1e-9, 1), 0.95)
    .option('--seed <n>', 'sampler seed (default: random, reported with --json)', parseNonNegativeInt('--seed'))
    .option('--perplexity <path>', 'measure perplexity over a text file, or every .txt file of a directory, instead of generating')
    .option('--context <n>', 'context length: KV-cache size, and the window of --perplexity (default: the model maximum; 1024 for --perplexity)', parsePositiveInt('--context'))
    .option('--dense', 'run every FFN on the dense path (default: TwELL sparse kernels for ReLU FFNs where they pay)')
    .option('--mmap', 'map the weights file instead of reading it into huge-page memory (opens faster and shares the page cache; decode is slower)')
    .addOption(kvCacheOption())
    .addOption(new Option('--backend <backend>', 'compute backend').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .option('--threads <n>', 'CPU threads (default: all cores)', parsePositiveInt('--threads'))
    .option('--json', 'print a JSON result on stdout (the generated text is not streamed)')
    .option('-q, --quiet', 'no progress or summary text')
    .action(async (model: string | undefined, opts: InferOptions) => runInfer(model ?? DEFAULT_MODEL, opts));
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

async function readTextPath(path: string): Promise<{ files: string[]; texts: string[] }> {
  const st = await stat(path);
  if (st.isDirectory()) {
    const files = (await readdir(path)).filter((f) => f.endsWith('.txt')).sort().map((f) => join(path, f));
    if (!files.length) throw new UsageError(`--perplexity: ${path} has no .txt files`);
    return { files, texts: await Promise.all(files.map((f) => readFile(f, 'utf8'))) };
  }
  return { files: [path], texts: [await readFile(path, 'utf8')] };
}

function summarizeActivity(layers: LayerActivity[]): string {
  const counted = layers.filter((l) => l.nnzMean !== null);
  if (!counted.length) return '';
  const mean = counted.reduce((a, l) => a + l.nnzMean!, 0) / counted.length;
  const dff = counted.reduce((a, l) => a + l.dFF, 0) / counted.length;
  const max = Math.max(...counted.map((l) => l.nnzMax));
  const overflow = layers.reduce((a, l) => a + l.overflowTiles, 0);
  return `FFN non-zeros per token: mean ${mean.toFixed(1)} of ${Math.round(dff)} (${((100 * mean) / dff).toFixed(1)}%), max ${max}; overflowing tiles ${overflow}`;
}

async function runInfer(modelPath: string, opts: InferOptions): Promise<void> {
  const out = new Output(opts);
  // auto: the CPU; cuda: only where allowed (resolveModelBackend says why not).
  const backend = resolveModelBackend(opts.backend);
  setThreads(opts.threads);
  const mode: FfnRunMode = opts.dense ? 'dense' : 'auto';

  // Inputs first, so that usage errors come before the model loads.
  let prompt: string | undefined;
  let corpus: { files: string[]; texts: string[] } | undefined;
  if (opts.perplexity !== undefined) {
    if (opts.prompt !== undefined) throw new UsageError('--prompt and --perplexity are exclusive');
    corpus = await readTextPath(opts.perplexity);
  } else {
    if (opts.prompt !== undefined) prompt = opts.prompt;
    else if (process.stdin.isTTY) throw new UsageError('give a prompt with --prompt, or pipe text on stdin');
    else prompt = await readStdin();
    if (!prompt.length) throw new UsageError('the prompt is empty');
  }

  const loadStart = performance.now();
  const rt = await ModelRuntime.load(modelPath, {
    context: opts.context,
    // Perplexity windows default to 1024 tokens (or the model's maximum when smaller).
    defaultContext: corpus ? 1024 : undefined,
    onNotice: (s) => out.note(s),
    backend,
    weights: opts.mmap ? 'mmap' : 'resident',
    kvCache: opts.kvCache,
  });
  try {
    const tok = rt.tokenizer;
    if (!tok) {
      throw new SparseLlmError(`${modelPath}: the model has no tokenizer (pack a checkpoint that has tokenizer.json beside its config.json)`);
    }
    const loadSeconds = (performance.now() - loadStart) / 1000;
    out.note(
      `${rt.spec.modelType}: ${rt.spec.nLayers} layers, d_model ${rt.spec.dModel}, ${rt.spec.activation} FFN, ${rt.storageDtype} weights ${formatBytes(rt.weightsBytes)}, context ${rt.context}${rt.kvCache === 'f32' ? '' : ` (${rt.kvCache} KV cache)`}; ${backend}, ${mode === 'dense' ? 'dense FFN' : 'sparse FFN where ReLU'} (loaded in ${loadSeconds.toFixed(2)}s)`,
    );

    if (corpus) {
      const ids: number[] = [];
      for (const text of corpus.texts) {
        for (const id of tok.encode(text)) ids.push(id);
      }
      if (ids.length < 2) throw new UsageError(`--perplexity: the text has ${ids.length} token(s); at least 2 are needed`);
      const bar = out.progress('perplexity', ids.length, 'items');
      const r = perplexity(rt, ids, rt.context, mode, (n) => bar.tick(n));
      bar.finish(`perplexity ${r.perplexity.toFixed(4)} over ${r.tokens} tokens (${r.windows} windows of ${rt.context}) in ${r.seconds.toFixed(2)}s`);
      const layers = rt.activity();
      if (out.json) {
        out.result({
          model: modelPath,
          backend,
          mode,
          kvCache: rt.kvCache,
          files: corpus.files,
          context: rt.context,
          tokens: r.tokens,
          windows: r.windows,
          nll: r.nll,
          perplexity: r.perplexity,
          seconds: r.seconds,
          tokensPerSecond: r.tokens / r.seconds,
          layers,
        });
      } else {
        process.stdout.write(`${r.perplexity.toFixed(4)}\n`);
        const s = summarizeActivity(layers);
        if (s) out.note(s);
      }
      return;
    }

    const ids = tok.encode(prompt!, { addSpecial: true });
    if (ids.length === 0) throw new UsageError('the prompt is empty after tokenization');
    if (ids.length > rt.context) {
      throw new UsageError(`the prompt has ${ids.length} tokens but the context holds ${rt.context}; shorten it or raise --context (at most ${rt.spec.maxPositions})`);
    }
    const seed = opts.seed ?? Math.floor(Math.random() * 2 ** 31);
    const stream = new StreamDecoder(tok);
    const result = generate(rt, ids, {
      maxTokens: Math.min(opts.maxTokens, rt.context - ids.length + 1),
      temperature: opts.temperature,
      topK: opts.topK,
      topP: opts.topP,
      seed,
      mode,
      eosId: tok.eosId,
      stopIds: rt.spec.eosTokenIds,
      sampleLimit: Math.min(tok.vocabSize, rt.spec.vocabSize),
      onToken: out.json ? undefined : (id) => process.stdout.write(stream.push(id)),
    });
    const text = tok.decode(result.tokens);
    const layers = rt.activity();
    const decodeTokens = Math.max(0, result.tokens.length - 1);
    const prefillTps = result.promptTokens / result.prefillSeconds;
    const decodeTps = decodeTokens > 0 ? decodeTokens / result.decodeSeconds : null;
    if (out.json) {
      out.result({
        model: modelPath,
        backend,
        mode,
        kvCache: rt.kvCache,
        seed,
        text,
        stoppedAt: result.stoppedAt,
        tokens: { prompt: result.promptTokens, generated: result.tokens.length },
        prefill: { tokens: result.promptTokens, seconds: result.prefillSeconds, tokensPerSecond: prefillTps },
        decode: { tokens: decodeTokens, seconds: result.decodeSeconds, tokensPerSecond: decodeTps },
        layers,
      });
      return;
    }
    process.stdout.write(stream.flush() + '\n');
    out.note(
      `${result.promptTokens} prompt tokens at ${prefillTps.toFixed(1)} tok/s; ${result.tokens.length} generated` +
        (decodeTps !== null ? ` at ${decodeTps.toFixed(1)} tok/s` : '') +
        ` (stopped: ${result.stoppedAt}, seed ${seed})`,
    );
    const s = summarizeActivity(layers);
    if (s) out.note(s);
  } finally {
    rt.close();
  }
}
