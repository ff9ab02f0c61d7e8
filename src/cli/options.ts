// Parsers for flag values, and options, shared by several commands. Parsers throw a UsageError (exit 2).
import { InvalidArgumentError, Option } from 'commander';

export function parsePositiveInt(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError(`${name} must be a positive integer, got '${value}'`);
    return n;
  };
}

export function parseNumberInRange(name: string, min: number, max: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isFinite(n) || n < min || n > max) {
      throw new InvalidArgumentError(`${name} must be a number in [${min}, ${max}], got '${value}'`);
    }
    return n;
  };
}

export function parseIntList(name: string) {
  return (value: string): number[] => {
    const parts = value.split(',').map((s) => s.trim()).filter(Boolean);
    const out = parts.map(Number);
    if (!out.length || out.some((n) => !Number.isInteger(n) || n < 1)) {
      throw new InvalidArgumentError(`${name} must be a comma-separated list of positive integers, got '${value}'`);
    }
    return out;
  };
}

/** --kv-cache, shared by infer and bench --model (ModelRuntime's LoadOptions.kvCache). */
export function kvCacheOption(prefix = ''): Option {
  return new Option(
    '--kv-cache <dtype>',
    `${prefix}the KV cache's element: f32, or bf16 for half its memory and of the bytes attention reads (keys and values rounded to bf16; cpu backend)`,
  )
    .choices(['f32', 'bf16'])
    .default('f32');
}
