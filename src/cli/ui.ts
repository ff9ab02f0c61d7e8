// Shared terminal UI: where human text goes, --json / --quiet handling, progress and tables.
// Commands parse flags and render through this; no math here.
import chalk from 'chalk';
import ora, { type Ora } from 'ora';
import Table from 'cli-table3';

export interface OutputOptions {
  json?: boolean;
  quiet?: boolean;
}

/**
 * Human text goes to stderr when --json is on (stdout stays parseable), to stdout otherwise.
 * --quiet silences human text and progress, never results or errors.
 */
export class Output {
  readonly json: boolean;
  readonly quiet: boolean;
  private readonly interactive: boolean;

  constructor(opts: OutputOptions = {}) {
    this.json = !!opts.json;
    this.quiet = !!opts.quiet;
    this.interactive = !!process.stderr.isTTY && !process.env.CI;
  }

  /** A line of human text (a heading, a summary, a notice). */
  say(text: string): void {
    if (this.quiet) return;
    (this.json ? process.stderr : process.stdout).write(text + '\n');
  }

  /** A notice that always goes to stderr (even without --json), unless --quiet. */
  note(text: string): void {
    if (!this.quiet) process.stderr.write(chalk.dim(text) + '\n');
  }

  warn(text: string): void {
    process.stderr.write(chalk.yellow(`warning: ${text}`) + '\n');
  }

  /** The machine-readable result of a command: printed only with --json. */
  result(value: unknown): void {
    if (this.json) process.stdout.write(JSON.stringify(value, null, 2) + '\n');
  }

  /** Renders rows as a table (to the human stream). */
  table(head: string[], rows: (string | number)[][]): void {
    if (this.quiet) return;
    const t = new Table({ head: head.map((h) => chalk.bold(h)), style: { head: [], border: [] } });
    for (const r of rows) t.push(r.map(String));
    this.say(t.toString());
  }

  /** A spinner on a TTY; plain start/finish lines otherwise; nothing with --quiet. */
  spinner(text: string): Spinner {
    return new Spinner(text, this.quiet ? 'silent' : this.interactive ? 'tty' : 'plain');
  }

  /** A progress bar over a known total (bytes or items), with rate and ETA. */
  progress(label: string, total: number, unit: 'bytes' | 'items' = 'items'): Progress {
    return new Progress(label, total, unit, this.quiet ? 'silent' : this.interactive ? 'tty' : 'plain');
  }
}

type Mode = 'tty' | 'plain' | 'silent';

export class Spinner {
  private readonly ora?: Ora;
  constructor(private text: string, private readonly mode: Mode) {
    if (mode === 'tty') this.ora = ora({ text, stream: process.stderr }).start();
  }
  update(text: string): void {
    this.text = text;
    if (this.ora) this.ora.text = text;
  }
  succeed(text = this.text): void {
    if (this.ora) this.ora.succeed(text);
    else if (this.mode === 'plain') process.stderr.write(`${text}\n`);
  }
  fail(text = this.text): void {
    if (this.ora) this.ora.fail(text);
  }
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function formatDuration(seconds: number): string {
  if (!isFinite(seconds)) return '?';
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)}s`;
  const m = Math.floor(seconds / 60);
  return `${m}m${Math.round(seconds - m * 60).toString().padStart(2, '0')}s`;
}

export class Progress {
  private done = 0;
  private readonly start = performance.now();
  private lastDraw = 0;
  private readonly ora?: Ora;

  constructor(
    private readonly label: string,
    private readonly total: number,
    private readonly unit: 'bytes' | 'items',
    private readonly mode: Mode,
  ) {
    if (mode === 'tty') this.ora = ora({ text: this.render(), stream: process.stderr }).start();
  }

  private fmt(n: number): string {
    return this.unit === 'bytes' ? formatBytes(n) : String(Math.round(n));
  }

  private render(): string {
    const elapsed = (performance.now() - this.start) / 1000;
    const frac = this.total > 0 ? Math.min(1, this.done / this.total) : 0;
    const width = 24;
    const filled = Math.round(frac * width);
    const bar = '█'.repeat(filled) + '░'.repeat(width - filled);
    const rate = elapsed > 0 ? this.done / elapsed : 0;
    const eta = rate > 0 ? (this.total - this.done) / rate : Infinity;
    const rateText = this.unit === 'bytes' ? `${formatBytes(rate)}/s` : `${rate.toFixed(1)}/s`;
    return `${this.label} ${bar} ${(frac * 100).toFixed(0).padStart(3)}% ${this.fmt(this.done)}/${this.fmt(this.total)} ${rateText} eta ${formatDuration(eta)}`;
  }

  /** Adds `n` to the amount done; redraws at most every 100 ms. */
  tick(n: number): void {
    this.done += n;
    const now = performance.now();
    if (this.ora && now - this.lastDraw > 100) {
      this.lastDraw = now;
      this.ora.text = this.render();
    }
  }

  finish(summary?: string): void {
    const elapsed = (performance.now() - this.start) / 1000;
    const text = summary ?? `${this.label} ${this.fmt(this.done)} in ${formatDuration(elapsed)}`;
    if (this.ora) this.ora.succeed(text);
    else if (this.mode === 'plain') process.stderr.write(text + '\n');
  }

  fail(): void {
    if (this.ora) this.ora.fail(`${this.label} failed`);
  }
}
