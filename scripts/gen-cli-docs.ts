// Writes docs/cli.md from the commands' own --help text, so the reference never drifts from the
// code. test/cli-docs.test.ts fails when docs/cli.md is stale: rerun
//   npx tsx scripts/gen-cli-docs.ts
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { Command } from 'commander';
import { buildProgram } from '../src/cli/main.js';

const HELP_WIDTH = 100;

function helpOf(cmd: Command): string {
  cmd.configureHelp({ helpWidth: HELP_WIDTH });
  return cmd.helpInformation().trimEnd();
}

export function renderCliDoc(): string {
  const program = buildProgram();
  const parts = [
    '# Command-line reference',
    '',
    'Generated from the commands\' own `--help` by `npx tsx scripts/gen-cli-docs.ts`; do not edit by hand.',
    'Conventions shared by every command: `--json` prints one parseable result on stdout and sends',
    'human text to stderr; `--quiet` silences progress and notices (never results or errors); errors',
    'are one line naming the file and the problem (`--verbose` adds the stack); exit codes are 0 on',
    'success, 1 on a failure, 2 on a usage error.',
    '',
    '## sparsellm',
    '',
    '```',
    helpOf(program),
    '```',
  ];
  for (const cmd of program.commands) {
    if (cmd.name() === 'help') continue;
    parts.push('', `## sparsellm ${cmd.name()}`, '', '```', helpOf(cmd), '```');
  }
  return parts.join('\n') + '\n';
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const out = new URL('../docs/cli.md', import.meta.url);
  writeFileSync(out, renderCliDoc());
  process.stderr.write(`wrote ${fileURLToPath(out)}\n`);
}
