// A training run: resolves options (defaults < config file < flags; a resumed run's saved
// options, which flags may not contradict), builds or loads the model, then loops: batch →
// native step → report → periodic validation and checkpoints. Knows nothing of the terminal:
// the caller gets events through RunHooks.
import { dirname } from 'node:path';
import { openCheckpoint } from '../checkpoint/dense.js';
import { SparseLlmError, UsageError } from '../errors.js';
import { ByteTokenizer, loadTokenizerDir, type Tokenizer } from '../tokenizer/index.js';
import { setThreads } from '../native.js';
import { byteTokenizerConfigJson, byteTokenizerJson } from './byte-tokenizer-json.js';
import {
  hfConfig,
  loadTrainingState,
  readTokenizerFiles,
  recoverCheckpoint,
  saveCheckpoint,
  type TokenizerFiles,
  type TrainMeta,
} from './checkpoint.js';
import { loadCorpus, trainBatch, validationBatches } from './data.js';
import { ModelTrainer, type FfnTrainPath, type StepResult, type TrainBackend, type TrainMatmul, type TrainModelShape, type TrainerHyper } from './engine.js';
import { learningRate } from './schedule.js';

export interface TrainOptions {
  data: string[];
  out: string;
  init: string | null;
  dModel: number;
  layers: number;
  heads: number;
  dFF: number;
  context: number;
  ropeTheta: number;
  steps: number;
  /** Stop (and save) after this step, keeping the schedule of `steps` (0 = run to `steps`). */
  stopAt: number;
  batchTokens: number;
  microBatchTokens: number;
  lr: number;
  minLrRatio: number;
  warmup: number;
  l1: number;
  weightDecay: number;
  beta1: number;
  beta2: number;
  clip: number;
  seed: number;
  evalInterval: number;
  evalTokens: number;
  saveInterval: number;
  /** false: write no checkpoint at all (timing and smoke runs; no output directory). */
  save: boolean;
  reinitDead: boolean;
  deadWindow: number;
  ffnPath: FfnTrainPath;
  hybridCutoff: number;
  recheckSteps: number;
  ellWidth: number;
}

export const DEFAULTS: TrainOptions = {
  data: [],
  out: '',
  init: null,
  dModel: 128,
  layers: 4,
  heads: 4,
  dFF: 512,
  context: 256,
  ropeTheta: 10000,
  steps: 1000,
  stopAt: 0,
  batchTokens: 8192,
  microBatchTokens: 2048,
  lr: 1e-3,
  minLrRatio: 0.1,
  warmup: 100,
  l1: 2e-5,
  weightDecay: 0.1,
  beta1: 0.9,
  beta2: 0.95,
  clip: 1.0,
  seed: 0,
  evalInterval: 100,
  evalTokens: 32768,
  saveInterval: 500,
  save: true,
  reinitDead: false,
  deadWindow: 100000,
  ffnPath: 'auto',
  hybridCutoff: 50,
  recheckSteps: 20,
  ellWidth: 128,
};

/** Options that define the model or the optimisation: a resumed run may not change them. */
const FIXED_ON_RESUME: (keyof TrainOptions)[] = [
  'init', 'dModel', 'layers', 'heads', 'dFF', 'context', 'ropeTheta', 'batchTokens', 'microBatchTokens', 'lr', 'minLrRatio',
  'warmup', 'l1', 'weightDecay', 'beta1', 'beta2', 'clip', 'seed', 'reinitDead', 'deadWindow', 'ffnPath', 'hybridCutoff',
  'recheckSteps', 'ellWidth', 'data',
];
/** Model-shape options that an --init checkpoint decides. */
const FROM_INIT: (keyof TrainOptions)[] = ['dModel', 'layers', 'heads', 'dFF', 'ropeTheta'];

function range(name: string, v: number, lo: number, hi: number, integer = false): void {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) {
    throw new UsageError(`${name} must be ${integer ? 'an integer' : 'a number'} in [${lo}, ${hi}], got ${v}`);
  }
}

/** Checks every option; throws a UsageError naming the first bad one. */
export function validateOptions(o: TrainOptions): void {
  range('--d-model', o.dModel, 2, 65536, true);
  range('--layers', o.layers, 1, 1024, true);
  range('--heads', o.heads, 1, 1024, true);
  range('--d-ff', o.dFF, 1, 1 << 20, true);
  range('--context', o.context, 2, 1 << 16, true);
  if (o.dModel % o.heads !== 0 || (o.dModel / o.heads) % 2 !== 0) {
    throw new UsageError(`--d-model ${o.dModel} must be a multiple of --heads ${o.heads} with an even head width`);
  }
  range('--steps', o.steps, 1, 1e9, true);
  range('--stop-at', o.stopAt, 0, o.steps, true);
  range('--batch-tokens', o.batchTokens, 1, 1e9, true);
  range('--micro-batch-tokens', o.microBatchTokens, 1, 1e9, true);
  if (o.microBatchTokens % o.context !== 0) {
    throw new UsageError(`--micro-batch-tokens ${o.microBatchTokens} must be a multiple of --context ${o.context} (whole sequences)`);
  }
  if (o.batchTokens % o.microBatchTokens !== 0) {
    throw new UsageError(`--batch-tokens ${o.batchTokens} must be a multiple of --micro-batch-tokens ${o.microBatchTokens}`);
  }
  range('--lr', o.lr, 0, 1);
  range('--min-lr-ratio', o.minLrRatio, 0, 1);
  range('--warmup', o.warmup, 0, o.steps, true);
  range('--l1', o.l1, 0, 1);
  range('--weight-decay', o.weightDecay, 0, 10);
  range('--beta1', o.beta1, 0, 0.999999);
  range('--beta2', o.beta2, 0, 0.999999);
  range('--clip', o.clip, 0, 1e6);
  range('--seed', o.seed, 0, 2 ** 32 - 1, true);
  range('--eval-interval', o.evalInterval, 0, 1e9, true);
  range('--eval-tokens', o.evalTokens, 1, 1e9, true);
  range('--save-interval', o.saveInterval, 0, 1e9, true);
  range('--dead-window', o.deadWindow, 0, 1e15, true);
  range('--hybrid-cutoff', o.hybridCutoff, 0, 1e9);
  range('--recheck-steps', o.recheckSteps, 1, 1e9, true);
  range('--ell-width', o.ellWidth, 1, 1 << 20, true);
  if (!['auto', 'dense', 'hybrid'].includes(o.ffnPath)) throw new UsageError(`--ffn-path must be auto, dense or hybrid, got ${o.ffnPath}`);
  if (o.save && !o.out) throw new UsageError('an output directory is required (-o <dir>), or --no-save to write no checkpoint');
}

export interface StepRecord {
  step: number;
  loss: number;
  ce: number;
  l1: number;
  lr: number;
  gradNorm: number;
  tokens: number;
  tokensPerSec: number;
  /** Mean non-zeros per token over layers, and per layer. */
  nnzPerToken: number;
  layerNnz: number[];
  /** 100 × (1 − nnzPerToken / dFF). */
  sparsity: number;
  dead: number;
  hybridLayers: number;
  reinitialised: number;
  valCe?: number;
}

export interface RunInfo {
  options: TrainOptions;
  shape: TrainModelShape;
  params: number;
  trainTokens: number;
  valTokens: number;
  files: number;
  startStep: number;
  tokenizer: string;
  resumedFrom: string | null;
  recovered: boolean;
  /** The records of the steps before this run (a resumed run's history). */
  history: StepRecord[];
}

export interface RunSummary {
  steps: number;
  stoppedEarly: boolean;
  finalLoss: number;
  finalCe: number;
  valCe: number | null;
  nnzPerToken: number;
  layerNnz: number[];
  sparsity: number;
  dead: number;
  tokensPerSec: number;
  seconds: number;
  /** The checkpoint directory, or null for a run with --no-save. */
  checkpoint: string | null;
  peakActivationBytes: number;
  /** --backend cuda: the GPU memory the trainer held at its peak (weights, optimizer, activations, scratch). */
  peakDeviceBytes?: number;
}

export interface RunHooks {
  onStart?(info: RunInfo): void;
  onStep?(rec: StepRecord): void;
  onEval?(step: number, valCe: number, valNnz: number[]): void;
  onSave?(dir: string, step: number): void;
  /** Polled after every step: true stops the run (it saves first). */
  shouldStop?(): boolean;
}

const CANONICAL_TO_HF: [RegExp, string][] = [
  [/^embed\.weight$/, 'model.embed_tokens.weight'],
  [/^final_norm\.weight$/, 'model.norm.weight'],
  [/^layers\.(\d+)\.attn_norm\.weight$/, 'model.layers.$1.input_layernorm.weight'],
  [/^layers\.(\d+)\.attn\.([qkvo])\.weight$/, 'model.layers.$1.self_attn.$2_proj.weight'],
  [/^layers\.(\d+)\.ffn_norm\.weight$/, 'model.layers.$1.post_attention_layernorm.weight'],
  [/^layers\.(\d+)\.ffn\.(gate|up|down)\.weight$/, 'model.layers.$1.mlp.$2_proj.weight'],
];

function hfName(canonical: string): string | null {
  for (const [re, to] of CANONICAL_TO_HF) if (re.test(canonical)) return canonical.replace(re, to);
  return null;
}

/** Loads a dense Llama-family checkpoint's weights into the trainer (canonical → HF names). */
async function loadWeights(path: string, trainer: ModelTrainer, warn: (s: string) => void): Promise<void> {
  const ck = await openCheckpoint(path);
  try {
    for (const name of ck.tensorNames()) {
      const hf = hfName(name);
      if (!hf) {
        if (name === 'lm_head.weight') {
          warn(`${path}: the output head is not tied to the embeddings; training ties them (lm_head.weight dropped)`);
          continue;
        }
        throw new SparseLlmError(`${path}: tensor ${name} has no place in the trained model`);
      }
      trainer.setTensor(hf, await ck.readF32(name));
    }
  } finally {
    await ck.close();
  }
}

interface Setup {
  options: TrainOptions;
  shape: TrainModelShape;
  tokenizer: Tokenizer;
  tokenizerFiles: TokenizerFiles | null;
  eosId: number | undefined;
  resume: { dir: string; meta: TrainMeta } | null;
}

/** Resolves the run's options and model shape. `given` holds only what the user set. */
export async function resolveRun(given: Partial<TrainOptions>, resumeDir: string | null, warn: (s: string) => void): Promise<Setup> {
  let options: TrainOptions;
  let resume: Setup['resume'] = null;
  if (given.save === false && given.out) throw new UsageError(`--no-save writes no checkpoint, so -o ${given.out} has nothing to hold: drop one of them`);
  if (resumeDir) {
    await recoverCheckpoint(resumeDir);
    let meta: TrainMeta;
    try {
      const { SafetensorsFile } = await import('../checkpoint/safetensors.js');
      const f = await SafetensorsFile.open(`${resumeDir}/training_state.safetensors`, { dtypes: ['F32', 'U8'] });
      const raw = f.metadata['sparsellm.train'];
      await f.close();
      if (!raw) throw new SparseLlmError(`${resumeDir}/training_state.safetensors: no training metadata`);
      meta = JSON.parse(raw) as TrainMeta;
    } catch (e) {
      if (e instanceof SparseLlmError) throw e;
      throw new SparseLlmError(`${resumeDir}: cannot resume: ${(e as Error).message}`);
    }
    const saved = { ...DEFAULTS, ...(meta.options as Partial<TrainOptions>) };
    for (const k of FIXED_ON_RESUME) {
      if (given[k] !== undefined && JSON.stringify(given[k]) !== JSON.stringify(saved[k])) {
        throw new UsageError(`--${k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())} ${JSON.stringify(given[k])} contradicts the checkpoint in ${resumeDir} (${JSON.stringify(saved[k])})`);
      }
    }
    options = { ...saved, stopAt: 0, ...given, out: given.out ?? resumeDir };
    resume = { dir: resumeDir, meta };
  } else {
    options = { ...DEFAULTS, ...given } as TrainOptions;
    // Default warm-up: 100 steps, or a tenth of a shorter run.
    if (given.warmup === undefined) options.warmup = Math.min(DEFAULTS.warmup, Math.floor(options.steps / 10));
  }
  let tokenizer: Tokenizer = new ByteTokenizer();
  let tokenizerFiles: TokenizerFiles | null = { json: byteTokenizerJson(), config: byteTokenizerConfigJson(options.context) };
  let vocab = 257;
  let eosId: number | undefined = tokenizer.eosId;
  const initPath = options.init;
  if (initPath) {
    const ck = await openCheckpoint(initPath);
    const spec = ck.spec;
    await ck.close();
    const where = initPath;
    if (spec.family !== 'llama' || !spec.gated || spec.norm !== 'rmsnorm' || spec.positions !== 'rope') {
      throw new SparseLlmError(`${where}: --init needs a Llama-family checkpoint (gated FFN, RMSNorm, RoPE); this is ${spec.modelType}`);
    }
    if (spec.nKvHeads !== spec.nHeads) throw new SparseLlmError(`${where}: grouped-query attention (${spec.nKvHeads} key/value heads for ${spec.nHeads}) is not supported by the trainer`);
    if (spec.qkvBias || spec.linearBias) throw new SparseLlmError(`${where}: attention or FFN biases are not supported by the trainer`);
    if (spec.headDim * spec.nHeads !== spec.dModel) throw new SparseLlmError(`${where}: head_dim × heads must equal hidden_size for the trainer`);
    if (new Set(spec.dFF).size !== 1) throw new SparseLlmError(`${where}: layers of different FFN widths (a pruned checkpoint) cannot be trained`);
    const fromInit: Partial<TrainOptions> = {
      dModel: spec.dModel,
      layers: spec.nLayers,
      heads: spec.nHeads,
      dFF: spec.dFF[0]!,
      ropeTheta: spec.ropeTheta,
    };
    for (const k of FROM_INIT) {
      if (given[k] !== undefined && given[k] !== fromInit[k] && !resume) {
        throw new UsageError(`--${k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())} ${given[k]} contradicts the --init checkpoint ${where} (${fromInit[k]})`);
      }
    }
    Object.assign(options, fromInit);
    if (given.context === undefined && !resume) options.context = Math.min(spec.maxPositions, DEFAULTS.context);
    if (spec.activation !== 'relu') warn(`${where}: the FFN gate uses ${spec.activation}; training switches it to ReLU`);
    vocab = spec.vocabSize;
    eosId = spec.eosTokenId;
    const dir = dirname(ck.sourceFiles.find((f) => f.path.endsWith('config.json'))?.path ?? `${initPath}/config.json`);
    const t = loadTokenizerDir(dir, eosId);
    if (!t) throw new SparseLlmError(`${where}: --init needs the checkpoint's tokenizer.json beside its config.json`);
    if (t.vocabSize > vocab) throw new SparseLlmError(`${where}: the tokenizer has ${t.vocabSize} ids but the model only ${vocab}`);
    tokenizer = t;
    tokenizerFiles = await readTokenizerFiles(dir);
  } else if (resume) {
    const t = loadTokenizerDir(resume.dir, 256);
    const tf = await readTokenizerFiles(resume.dir);
    if (!t || !tf) throw new SparseLlmError(`${resume.dir}: the checkpoint has no tokenizer.json`);
    tokenizerFiles = tf;
    if (!tf.config || !String(tf.config).includes('"sparsellm_tokenizer": "byte"')) tokenizer = t;
  }
  if (!options.data.length) throw new UsageError('no training text given (pass text files or directories)');
  validateOptions(options);
  const shape: TrainModelShape = {
    vocab,
    dModel: options.dModel,
    layers: options.layers,
    heads: options.heads,
    dFF: options.dFF,
    context: options.context,
    ropeTheta: options.ropeTheta,
    normEps: 1e-5,
  };
  if (resume) {
    // The checkpoint's config must describe the same model the options do.
    const ck = await openCheckpoint(resume.dir);
    const s = ck.spec;
    await ck.close();
    if (s.dModel !== shape.dModel || s.nLayers !== shape.layers || s.nHeads !== shape.heads || s.dFF[0] !== shape.dFF || (!initPath && s.vocabSize !== vocab)) {
      throw new SparseLlmError(`${resume.dir}/config.json contradicts its training state (hidden_size ${s.dModel}, layers ${s.nLayers}, heads ${s.nHeads}, intermediate_size ${s.dFF[0]})`);
    }
    shape.vocab = s.vocabSize;
    if (initPath) eosId = s.eosTokenId;
  }
  return { options, shape, tokenizer, tokenizerFiles, eosId, resume };
}

function hyperOf(o: TrainOptions): TrainerHyper {
  return {
    beta1: o.beta1,
    beta2: o.beta2,
    eps: 1e-8,
    weightDecay: o.weightDecay,
    clip: o.clip,
    l1: o.l1,
    ffnPath: o.ffnPath,
    hybridCutoff: o.hybridCutoff,
    recheckSteps: o.recheckSteps,
    ellWidth: o.ellWidth,
    deadWindow: o.deadWindow,
    reinitDead: o.reinitDead,
    initStd: 0.02,
    seed: o.seed,
  };
}

/** Where and how the steps run; none of it changes what a checkpoint holds. */
export interface TrainDevice {
  /** CPU threads (default: all cores). */
  threads?: number;
  backend?: TrainBackend;
  /** The GPU trainer's matrix products (default bf16 on cuda; the CPU is f32 only). */
  matmul?: TrainMatmul;
}

export async function runTraining(setup: Setup, hooks: RunHooks, warn: (s: string) => void, device: TrainDevice = {}): Promise<RunSummary> {
  const { options: o, shape } = setup;
  const backend = device.backend ?? 'cpu';
  setThreads(device.threads);
  const corpus = await loadCorpus(o.data, setup.tokenizer, o.context);
  for (let i = 0; i < corpus.train.length; i++) {
    if (corpus.train[i]! >= shape.vocab) throw new SparseLlmError(`token id ${corpus.train[i]} from the tokenizer is outside the model's vocabulary (${shape.vocab})`);
  }
  const trainer = new ModelTrainer(shape, hyperOf(o), backend, device.matmul);
  let startStep = 0;
  let history: StepRecord[] = [];
  let tokensSeen = 0;
  let elapsed0 = 0;
  let recovered = false;
  if (setup.resume) {
    await loadWeights(setup.resume.dir, trainer, warn);
    const { meta, state } = await loadTrainingState(setup.resume.dir, trainer.paramCount, shape.layers, shape.dFF);
    trainer.setState(state);
    startStep = meta.step;
    history = (meta.history ?? []) as StepRecord[];
    tokensSeen = meta.tokensSeen;
    elapsed0 = meta.elapsedSeconds ?? 0;
  } else if (o.init) {
    await loadWeights(o.init, trainer, warn);
  } else {
    trainer.initWeights();
  }
  if (o.save) recovered = await recoverCheckpoint(o.out);
  const T = o.context;
  const B = o.microBatchTokens / T;
  const nMicro = o.batchTokens / o.microBatchTokens;
  const valSets = validationBatches(corpus.val, T, B, o.evalTokens);
  hooks.onStart?.({
    options: o,
    shape,
    params: trainer.paramCount,
    trainTokens: corpus.train.length,
    valTokens: corpus.val.length,
    files: corpus.files.length,
    startStep,
    tokenizer: setup.tokenizer.kind,
    resumedFrom: setup.resume?.dir ?? null,
    recovered,
    history: [...history],
  });
  const config = hfConfig(shape, setup.eosId, { trained_by: 'sparsellm train', l1: o.l1, seed: o.seed });
  let lastVal: number | null = null;
  let lastValNnz: number[] = [];
  const evaluate = (): number => {
    let ce = 0;
    let n = 0;
    const nnz = new Array<number>(shape.layers).fill(0);
    for (const v of valSets) {
      const r = trainer.evaluate(v.tokens, v.B, T);
      ce += r.ce * r.tokens;
      n += r.tokens;
      r.nnz.forEach((x, i) => (nnz[i]! += x));
    }
    lastValNnz = nnz.map((x) => x / n);
    return ce / n;
  };
  const startedAt = performance.now();
  let runTokens = 0;
  let runSeconds = 0;
  const save = async (step: number): Promise<void> => {
    if (!o.save) return;
    const st = trainer.getState();
    const meta: TrainMeta = {
      version: 1,
      step,
      tokensSeen,
      windowTokens: st.windowTokens,
      hybrid: st.hybrid,
      lastNnz: st.lastNnz,
      dead: st.dead,
      options: o as unknown as Record<string, unknown>,
      history,
      elapsedSeconds: elapsed0 + (performance.now() - startedAt) / 1000,
    };
    await saveCheckpoint(o.out, trainer, config, setup.tokenizerFiles, meta);
    hooks.onSave?.(o.out, step);
  };
  const endStep = o.stopAt > 0 ? o.stopAt : o.steps;
  let step = startStep;
  let last: StepResult | null = null;
  let lastRec: StepRecord | null = null;
  let stoppedEarly = false;
  let savedAt = -1;
  while (step < endStep) {
    const lr = learningRate({ lr: o.lr, warmup: o.warmup, steps: o.steps, minRatio: o.minLrRatio }, step);
    const tokens = trainBatch(corpus.train, o.seed, step, nMicro * B, T);
    const t0 = performance.now();
    last = trainer.step(tokens, nMicro, B, T, lr);
    const dt = (performance.now() - t0) / 1000;
    step += 1;
    tokensSeen += last.tokens;
    runTokens += last.tokens;
    runSeconds += dt;
    const layerNnz = last.layers.map((l) => l.nnz / l.tokens);
    const nnzPerToken = layerNnz.reduce((a, b) => a + b, 0) / layerNnz.length;
    const rec: StepRecord = {
      step,
      loss: last.loss,
      ce: last.ce,
      l1: last.l1,
      lr,
      gradNorm: last.gradNorm,
      tokens: last.tokens,
      tokensPerSec: last.tokens / dt,
      nnzPerToken,
      layerNnz,
      sparsity: 100 * (1 - nnzPerToken / shape.dFF),
      dead: last.layers.reduce((a, l) => a + l.dead, 0),
      hybridLayers: last.layers.filter((l) => l.hybrid).length,
      reinitialised: last.reinitialised,
    };
    if (!Number.isFinite(rec.loss)) throw new SparseLlmError(`the loss diverged at step ${step} (lower --lr)`);
    if ((o.evalInterval > 0 && step % o.evalInterval === 0) || step === o.steps) {
      lastVal = evaluate();
      rec.valCe = lastVal;
      hooks.onEval?.(step, lastVal, lastValNnz);
    }
    history.push(rec);
    lastRec = rec;
    hooks.onStep?.(rec);
    await new Promise((r) => setImmediate(r)); // let signal handlers run between steps
    const stop = hooks.shouldStop?.() ?? false;
    if ((o.saveInterval > 0 && step % o.saveInterval === 0) || step === endStep || stop) {
      await save(step);
      savedAt = step;
    }
    if (stop) {
      stoppedEarly = true;
      break;
    }
  }
  if (savedAt !== step) await save(step);
  if (lastVal === null) {
    lastVal = evaluate();
    if (lastRec) lastRec.valCe = lastVal;
    hooks.onEval?.(step, lastVal, lastValNnz);
  }
  const finalNnz = lastRec ? lastRec.nnzPerToken : 0;
  return {
    steps: step,
    stoppedEarly,
    finalLoss: lastRec?.loss ?? NaN,
    finalCe: lastRec?.ce ?? NaN,
    valCe: lastVal,
    nnzPerToken: finalNnz,
    layerNnz: lastRec?.layerNnz ?? [],
    sparsity: lastRec?.sparsity ?? 0,
    dead: lastRec?.dead ?? 0,
    tokensPerSec: runSeconds > 0 ? runTokens / runSeconds : 0,
    seconds: (performance.now() - startedAt) / 1000,
    checkpoint: o.save ? o.out : null,
    peakActivationBytes: trainer.peakSavedBytes,
    ...(trainer.peakDeviceBytes !== undefined ? { peakDeviceBytes: trainer.peakDeviceBytes } : {}),
  };
}

