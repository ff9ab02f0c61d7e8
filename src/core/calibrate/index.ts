// Activation statistics over calibration text (used by prune, and by pack through prune's output).
export { LayerStats, TILE_WIDTHS, HIST_BINS } from './stats.js';
export type { LayerSummary, TileWidth } from './stats.js';
export { calibrate } from './run.js';
export type { CalibrateOptions } from './run.js';
export { chooseTwell, compressionFor, coveredCount, DEFAULT_COVERAGE, DEFAULT_HEADROOM } from './twell.js';
export type { TwellChoice } from './twell.js';
export { resolveTextFiles, tokenizeText } from './text.js';
export type { TokenizedText } from './text.js';
