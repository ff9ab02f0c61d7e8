// The packed format's metadata (docs/format.md, section 4): types, encoding, and a validating
// decoder whose every error names the file and the metadata key at fault.
import { FormatError } from '../errors.js';
import type { Activation, ModelFamily, ModelSpec } from '../model/spec.js';

export const FORMAT_NAME = 'sparsellm-packed';
export const FORMAT_VERSION = 1;
/** Every tensor starts at a file offset that is a multiple of this. */
export const ALIGNMENT = 64;
export const FILE_EXTENSION = '.sllm';

export type StorageDType = 'BF16' | 'F16' | 'F32';
export const STORAGE_DTYPES: readonly StorageDType[] = ['BF16', 'F16', 'F32'];

/** TwELL parameters of one layer: tile width T and compression factor C (T/C − 1 entries per tile). */
export interface TwellParams {
  tileWidth: number;
  compression: number;
}

/** Activation statistics of one layer over calibration text. */
export interface LayerCalibration {
  tokens: number;
  nnzMean: number;
  nnzP99: number;
  nnzMax: number;
  tileWidth: number;
  /** Per tile of `tileWidth` neurons: the maximum number of non-zeros seen for one token. */
  tileMax: number[];
}

/** One layer's FFN description (docs/format.md 4.2). */
export interface PackedLayer {
  dFF: number;
  sourceDFF: number;
  activation: Activation;
  twell: TwellParams | null;
  /** Name of the I32 [dFF] tensor mapping packed neuron → source neuron, or null (identity). */
  neuronMap: string | null;
  /** |act(g)| <= threshold counts as inactive (non-ReLU models); null: exact zeros only. */
  threshold: number | null;
  calibration: LayerCalibration | null;
  /** Fields a later version added that this build does not know; kept, not interpreted. */
  [extra: string]: unknown;
}

export type TokenizerInfo =
  | {
      kind: 'huggingface';
      /** Always "tokenizer.json": the U8 tensor holding the file's bytes. */
      tensor: string;
      bytes: number;
      /** tokenizer_config.json (special tokens, chat template) when the source has one. */
      config: { tensor: string; bytes: number } | null;
    }
  | { kind: 'byte' }
  | { kind: 'none' };

export interface SourceFile {
  name: string;
  bytes: number;
}

export interface Provenance {
  tool: string;
  toolVersion: string;
  createdAt: string;
  sourceFiles: SourceFile[];
  contentHash: { algorithm: 'sha256'; hex: string };
}

export interface PackedMetadata {
  storageDtype: StorageDType;
  spec: ModelSpec;
  layers: PackedLayer[];
  tokenizer: TokenizerInfo;
  provenance: Provenance;
}

/** The name of layer i's neuron-map tensor when it has one. */
export const neuronMapName = (i: number): string => `layers.${i}.ffn.neuron_map`;

/** The `__metadata__` strings for `m` (docs/format.md section 4). */
export function encodeMetadata(m: PackedMetadata): Record<string, string> {
  return {
    format: FORMAT_NAME,
    format_version: String(FORMAT_VERSION),
    storage_dtype: m.storageDtype,
    model: JSON.stringify(m.spec),
    layers: JSON.stringify(m.layers),
    tokenizer: JSON.stringify(m.tokenizer),
    // Last, so that the content-hash placeholder is the last occurrence in the header.
    provenance: JSON.stringify(m.provenance),
  };
}

/** The layer entries of a dense (unpruned, uncalibrated) model. */
export function denseLayers(spec: ModelSpec): PackedLayer[] {
  return spec.dFF.map((dFF) => ({
    dFF,
    sourceDFF: dFF,
    activation: spec.activation,
    twell: null,
    neuronMap: null,
    threshold: null,
    calibration: null,
  }));
}

// ---------------------------------------------------------------------------------------------
// Decoding

const FAMILIES: readonly ModelFamily[] = ['llama', 'gpt2', 'opt'];
const ACTIVATIONS: readonly Activation[] = ['relu', 'silu', 'gelu', 'gelu_tanh'];

type Obj = Record<string, unknown>;

/** Small typed accessors that throw FormatError naming file, key and field. */
class Fields {
  constructor(
    private readonly file: string,
    private readonly where: string,
    private readonly obj: Obj,
    private readonly prefix = '',
  ) {}

  fail(field: string, problem: string): never {
    throw new FormatError(this.file, `metadata '${this.where}': ${this.prefix}${field} ${problem}`);
  }

  has(field: string): boolean {
    return Object.prototype.hasOwnProperty.call(this.obj, field) && this.obj[field] !== undefined;
  }

  raw(field: string): unknown {
    if (!this.has(field)) this.fail(field, 'is missing');
    return this.obj[field];
  }

  int(field: string, min: number): number {
    const v = this.raw(field);
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) this.fail(field, `must be an integer >= ${min}, found ${JSON.stringify(v)}`);
    return v;
  }

  num(field: string, min = -Infinity): number {
    const v = this.raw(field);
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min) this.fail(field, `must be a finite number${min > -Infinity ? ` >= ${min}` : ''}, found ${JSON.stringify(v)}`);
    return v;
  }

  bool(field: string): boolean {
    const v = this.raw(field);
    if (typeof v !== 'boolean') this.fail(field, `must be true or false, found ${JSON.stringify(v)}`);
    return v;
  }

  str(field: string): string {
    const v = this.raw(field);
    if (typeof v !== 'string') this.fail(field, `must be a string, found ${JSON.stringify(v)}`);
    return v;
  }

  oneOf<T extends string>(field: string, allowed: readonly T[]): T {
    const v = this.raw(field);
    if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) {
      this.fail(field, `must be one of ${allowed.map((a) => JSON.stringify(a)).join(', ')}, found ${JSON.stringify(v)}`);
    }
    return v as T;
  }

  object(field: string): Obj {
    const v = this.raw(field);
    if (typeof v !== 'object' || v === null || Array.isArray(v)) this.fail(field, `must be a JSON object, found ${JSON.stringify(v)?.slice(0, 60)}`);
    return v as Obj;
  }

  intArray(field: string, min: number, length?: number): number[] {
    const v = this.raw(field);
    if (!Array.isArray(v)) this.fail(field, 'must be an array of integers');
    if (length !== undefined && v.length !== length) this.fail(field, `must have ${length} entries, found ${v.length}`);
    v.forEach((x, i) => {
      if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < min) this.fail(`${field}[${i}]`, `must be an integer >= ${min}, found ${JSON.stringify(x)}`);
    });
    return v as number[];
  }
}

function parseJsonKey(file: string, metadata: Readonly<Record<string, string>>, key: string): unknown {
  const text = metadata[key];
  if (text === undefined) throw new FormatError(file, `metadata key '${key}' is missing (not a complete sparsellm packed file)`);
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FormatError(file, `metadata '${key}' is not valid JSON (${(e as Error).message})`);
  }
}

function asObject(file: string, key: string, v: unknown): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new FormatError(file, `metadata '${key}' must be a JSON object`);
  return v as Obj;
}

/** Checks `format` and `format_version`; the first thing a reader does. */
export function checkFormatVersion(file: string, metadata: Readonly<Record<string, string>>): void {
  const name = metadata.format;
  if (name === undefined) {
    throw new FormatError(file, `no 'format' metadata: a safetensors file, but not a sparsellm packed model (make one with 'sparsellm pack')`);
  }
  if (name !== FORMAT_NAME) throw new FormatError(file, `metadata 'format' is ${JSON.stringify(name)}, expected "${FORMAT_NAME}"`);
  const v = metadata.format_version;
  if (v === undefined) throw new FormatError(file, `metadata key 'format_version' is missing`);
  if (!/^[1-9][0-9]{0,8}$/.test(v)) throw new FormatError(file, `metadata 'format_version' is ${JSON.stringify(v)}, not a positive integer`);
  const n = Number(v);
  if (n > FORMAT_VERSION) {
    throw new FormatError(file, `was written by a newer sparsellm (format version ${n}); this build reads version ${FORMAT_VERSION}`);
  }
  if (n !== FORMAT_VERSION) throw new FormatError(file, `format version ${n} is not supported; this build reads version ${FORMAT_VERSION}`);
}

export function decodeSpec(file: string, v: unknown): ModelSpec {
  const f = new Fields(file, 'model', asObject(file, 'model', v));
  const nLayers = f.int('nLayers', 1);
  const spec: ModelSpec = {
    family: f.oneOf('family', FAMILIES),
    modelType: f.str('modelType'),
    vocabSize: f.int('vocabSize', 1),
    dModel: f.int('dModel', 1),
    nLayers,
    nHeads: f.int('nHeads', 1),
    nKvHeads: f.int('nKvHeads', 1),
    headDim: f.int('headDim', 1),
    dFF: f.intArray('dFF', 1, nLayers),
    maxPositions: f.int('maxPositions', 1),
    gated: f.bool('gated'),
    activation: f.oneOf('activation', ACTIVATIONS),
    norm: f.oneOf('norm', ['rmsnorm', 'layernorm'] as const),
    normEps: f.num('normEps', 0),
    positions: f.oneOf('positions', ['rope', 'learned'] as const),
    ropeTheta: f.num('ropeTheta'),
    positionOffset: f.int('positionOffset', 0),
    tiedEmbeddings: f.bool('tiedEmbeddings'),
    qkvBias: f.bool('qkvBias'),
    linearBias: f.bool('linearBias'),
    config: f.object('config'),
  };
  if (f.has('slidingWindow')) spec.slidingWindow = f.int('slidingWindow', 1);
  if (f.has('bosTokenId')) spec.bosTokenId = f.int('bosTokenId', 0);
  if (f.has('eosTokenId')) spec.eosTokenId = f.int('eosTokenId', 0);
  if (f.has('eosTokenIds')) spec.eosTokenIds = f.intArray('eosTokenIds', 0);
  if (spec.nHeads % spec.nKvHeads !== 0) f.fail('nKvHeads', `(${spec.nKvHeads}) must divide nHeads (${spec.nHeads})`);
  return spec;
}

function decodeLayers(file: string, v: unknown, spec: ModelSpec): PackedLayer[] {
  if (!Array.isArray(v)) throw new FormatError(file, `metadata 'layers' must be a JSON array`);
  if (v.length !== spec.nLayers) throw new FormatError(file, `metadata 'layers' has ${v.length} entries, but the model has ${spec.nLayers} layers`);
  return v.map((entry, i) => {
    const prefix = `layers[${i}].`;
    const f = new Fields(file, 'layers', asObject(file, `layers' entry '${i}`, entry), prefix);
    const dFF = f.int('dFF', 1);
    if (dFF !== spec.dFF[i]) f.fail('dFF', `is ${dFF}, but model.dFF[${i}] is ${spec.dFF[i]}`);
    const sourceDFF = f.int('sourceDFF', 1);
    if (sourceDFF < dFF) f.fail('sourceDFF', `(${sourceDFF}) is smaller than dFF (${dFF})`);
    const activation = f.oneOf('activation', ACTIVATIONS);
    let twell: TwellParams | null = null;
    if (f.raw('twell') !== null) {
      const t = new Fields(file, 'layers', f.object('twell'), prefix + 'twell.');
      const tileWidth = t.int('tileWidth', 1);
      const compression = t.int('compression', 1);
      if (Math.floor(tileWidth / compression) - 1 < 1) f.fail('twell', `tileWidth ${tileWidth} / compression ${compression} leaves no entries per tile`);
      twell = { tileWidth, compression };
    }
    let neuronMap: string | null = null;
    if (f.raw('neuronMap') !== null) {
      neuronMap = f.str('neuronMap');
      if (neuronMap !== neuronMapName(i)) f.fail('neuronMap', `must be null or "${neuronMapName(i)}", found ${JSON.stringify(neuronMap)}`);
    } else if (sourceDFF !== dFF) {
      f.fail('neuronMap', `is null, but dFF (${dFF}) differs from sourceDFF (${sourceDFF}): a pruned layer needs a neuron map`);
    }
    const threshold = f.raw('threshold') === null ? null : f.num('threshold', 0);
    let calibration: LayerCalibration | null = null;
    if (f.raw('calibration') !== null) {
      const c = new Fields(file, 'layers', f.object('calibration'), prefix + 'calibration.');
      const tileWidth = c.int('tileWidth', 1);
      calibration = {
        tokens: c.int('tokens', 0),
        nnzMean: c.num('nnzMean', 0),
        nnzP99: c.num('nnzP99', 0),
        nnzMax: c.num('nnzMax', 0),
        tileWidth,
        tileMax: c.intArray('tileMax', 0, Math.ceil(dFF / tileWidth)),
      };
    }
    return { ...(entry as Obj), dFF, sourceDFF, activation, twell, neuronMap, threshold, calibration };
  });
}

function decodeTokenizer(file: string, v: unknown): TokenizerInfo {
  const f = new Fields(file, 'tokenizer', asObject(file, 'tokenizer', v));
  const kind = f.oneOf('kind', ['huggingface', 'byte', 'none'] as const);
  if (kind !== 'huggingface') return { kind };
  const tensor = f.str('tensor');
  if (tensor !== 'tokenizer.json') f.fail('tensor', `must be "tokenizer.json", found ${JSON.stringify(tensor)}`);
  let config: { tensor: string; bytes: number } | null = null;
  if (f.raw('config') !== null) {
    const c = new Fields(file, 'tokenizer', f.object('config'), 'config.');
    const t = c.str('tensor');
    if (t !== 'tokenizer_config.json') c.fail('tensor', `must be "tokenizer_config.json", found ${JSON.stringify(t)}`);
    config = { tensor: t, bytes: c.int('bytes', 0) };
  }
  return { kind, tensor, bytes: f.int('bytes', 0), config };
}

function decodeProvenance(file: string, v: unknown): Provenance {
  const f = new Fields(file, 'provenance', asObject(file, 'provenance', v));
  const filesRaw = f.raw('sourceFiles');
  if (!Array.isArray(filesRaw)) return f.fail('sourceFiles', 'must be an array');
  const sourceFiles = filesRaw.map((x: unknown, i: number) => {
    const s = new Fields(file, 'provenance', asObject(file, `provenance' sourceFiles entry '${i}`, x), `sourceFiles[${i}].`);
    return { name: s.str('name'), bytes: s.int('bytes', 0) };
  });
  const h = new Fields(file, 'provenance', f.object('contentHash'), 'contentHash.');
  const algorithm = h.oneOf('algorithm', ['sha256'] as const);
  const hex = h.str('hex');
  if (!/^[0-9a-f]{64}$/.test(hex)) h.fail('hex', 'must be 64 lowercase hex digits');
  return { tool: f.str('tool'), toolVersion: f.str('toolVersion'), createdAt: f.str('createdAt'), sourceFiles, contentHash: { algorithm, hex } };
}

/** Decodes and validates every metadata key (after checkFormatVersion). */
export function decodeMetadata(file: string, metadata: Readonly<Record<string, string>>): PackedMetadata {
  checkFormatVersion(file, metadata);
  const sd = metadata.storage_dtype;
  if (sd === undefined) throw new FormatError(file, `metadata key 'storage_dtype' is missing`);
  if (!(STORAGE_DTYPES as readonly string[]).includes(sd)) {
    throw new FormatError(file, `metadata 'storage_dtype' is ${JSON.stringify(sd)}, expected one of ${STORAGE_DTYPES.join(', ')}`);
  }
  const spec = decodeSpec(file, parseJsonKey(file, metadata, 'model'));
  const layers = decodeLayers(file, parseJsonKey(file, metadata, 'layers'), spec);
  const tokenizer = decodeTokenizer(file, parseJsonKey(file, metadata, 'tokenizer'));
  const provenance = decodeProvenance(file, parseJsonKey(file, metadata, 'provenance'));
  return { storageDtype: sd as StorageDType, spec, layers, tokenizer, provenance };
}
