// The packed model format (.sllm): see docs/format.md for the definition.
export { openPacked, PackedModel, ffnTensorNames } from './reader.js';
export type { PackedTensor } from './reader.js';
export { writePacked, checkOutputPath, InterruptedError } from './writer.js';
export type { PackInput, WritePackedOptions, WritePackedResult } from './writer.js';
export { packInputFromCheckpoint, checkpointDir } from './source.js';
export { verifyPacked } from './verify.js';
export type { VerifyResult, Mismatch } from './verify.js';
export { packedLayout } from './layout.js';
export type { PackedTensorDecl, PackedSource } from './layout.js';
export {
  FORMAT_NAME,
  FORMAT_VERSION,
  ALIGNMENT,
  FILE_EXTENSION,
  STORAGE_DTYPES,
  neuronMapName,
  decodeMetadata,
  encodeMetadata,
} from './metadata.js';
export type {
  StorageDType,
  TwellParams,
  LayerCalibration,
  PackedLayer,
  TokenizerInfo,
  Provenance,
  PackedMetadata,
  SourceFile,
} from './metadata.js';
