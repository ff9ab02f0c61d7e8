// Dense checkpoint reading: the safetensors container, Hugging Face config → ModelSpec, and the
// checkpoint reader that puts the two together.
export { SafetensorsFile, SafetensorsWriter, planSafetensors, PAD_PREFIX, DENSE_DTYPES, MAX_HEADER_BYTES, SAFETENSORS_DTYPE_SIZES } from './safetensors.js';
export type { TensorInfo, TensorDecl, WriterOptions, OpenOptions } from './safetensors.js';
export { specFromConfig, SUPPORTED_MODEL_TYPES } from './config.js';
export { openCheckpoint } from './dense.js';
export type { DenseCheckpoint, CheckpointEntry, SourceFile, Transform } from './dense.js';
