// The model `infer` and `bench --model` use when none is named: a small ReLU-sparse Llama trained
// by `sparsellm train` on Moby-Dick (fixtures/trained/moby-relu; fixtures/README.md has the
// exact command that made it), so the commands run on a real trained model out of the box.
import { fileURLToPath } from 'node:url';

export const DEFAULT_MODEL = fileURLToPath(new URL('../../fixtures/trained/moby-relu', import.meta.url));
export const DEFAULT_MODEL_NOTE = 'fixtures/trained/moby-relu (4 layers × 128, ReLU + L1, trained here on Moby-Dick)';
