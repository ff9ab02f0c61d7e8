// Temporary directories for tests, removed when the test (or suite) ends.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** A fresh directory under the OS temp dir; `t.after` (or the returned cleanup) removes it. */
export function makeTempDir(prefix = 'sparsellm-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Same, registered with a node:test context (`t.after`) or suite hook (`after`). */
export function tempDir(register: (fn: () => void) => void, prefix?: string): string {
  const { dir, cleanup } = makeTempDir(prefix);
  register(cleanup);
  return dir;
}
