// The `sparsellm` command line: one file per verb registers itself here.
import { Command, CommanderError } from 'commander';
import chalk from 'chalk';
import { SparseLlmError } from '../core/errors.js';
import { VERSION } from './version.js';
import { registerInfo } from './info.js';
import { registerPack } from './pack.js';
import { registerInfer } from './infer.js';
import { registerPrune } from './prune.js';
import { registerBench } from './bench.js';
import { registerTrain } from './train.js';

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('sparsellm')
    .description('Make ReLU-sparse transformer LLMs fast: pack, prune, train, infer and bench on TwELL kernels')
    .version(VERSION, '-V, --version')
    .option('--verbose', 'print stack traces with errors')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride();
  registerInfo(program);
  registerPack(program);
  registerInfer(program);
  registerPrune(program);
  registerBench(program);
  registerTrain(program);
  return program;
}

/** Runs the CLI; resolves to the process exit code. */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      // help and version exit through here with code 0; usage errors were already printed.
      return err.exitCode === 0 ? 0 : 2;
    }
    const verbose = program.opts().verbose || process.argv.includes('--verbose');
    if (err instanceof SparseLlmError) {
      process.stderr.write(chalk.red(`sparsellm: error: ${err.message}`) + '\n');
      if (verbose && err.stack) process.stderr.write(err.stack + '\n');
      return err.exitCode;
    }
    const e = err as NodeJS.ErrnoException;
    if (e && e.code && e.message) {
      // File-system errors already name the path (e.g. ENOENT: no such file ..., open 'x').
      process.stderr.write(chalk.red(`sparsellm: error: ${e.message}`) + '\n');
      if (verbose && e.stack) process.stderr.write(e.stack + '\n');
      return 1;
    }
    process.stderr.write(chalk.red(`sparsellm: internal error: ${String((err as Error)?.message ?? err)}`) + '\n');
    if ((err as Error)?.stack) process.stderr.write((err as Error).stack + '\n');
    return 1;
  }
}
