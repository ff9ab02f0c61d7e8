// Typed errors. The CLI prints `message` on one line (the stack only with --verbose) and exits
// with `exitCode`: 2 for usage errors, 1 for everything else.

export class SparseLlmError extends Error {
  readonly exitCode: number = 1;
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** A command-line usage problem (bad flag value, missing argument). Exit code 2. */
export class UsageError extends SparseLlmError {
  override readonly exitCode = 2;
}

/** A file that cannot be read as what it claims to be. The message names the file. */
export class FormatError extends SparseLlmError {
  constructor(readonly file: string, problem: string) {
    super(`${file}: ${problem}`);
  }
}

/** A checkpoint whose config or tensors do not describe a supported model. */
export class ModelError extends SparseLlmError {
  constructor(readonly file: string, problem: string) {
    super(`${file}: ${problem}`);
  }
}
