// docs/cli.md is generated from the commands' --help; a stale copy fails here.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { renderCliDoc } from '../scripts/gen-cli-docs.js';

test('docs/cli.md matches the commands (regenerate: npx tsx scripts/gen-cli-docs.ts)', () => {
  const committed = readFileSync(new URL('../docs/cli.md', import.meta.url), 'utf8');
  assert.equal(committed, renderCliDoc());
});
