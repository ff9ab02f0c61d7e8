// Calibration and evaluation text: files, or directories of .txt/.md files (recursively, in name
// order), concatenated with a newline between files, then tokenized.
import { readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { UsageError } from '../errors.js';
import type { Tokenizer } from '../tokenizer/index.js';

const TEXT_EXTENSIONS = ['.txt', '.md'];

async function listTextFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  const entries = (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const e of entries) {
    if (e.name.startsWith('.')) continue;
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await listTextFiles(p)));
    else if (e.isFile() && TEXT_EXTENSIONS.some((x) => e.name.endsWith(x))) out.push(p);
  }
  return out;
}

/** The files behind `paths` (each a file, or a directory searched for .txt/.md files). */
export async function resolveTextFiles(paths: readonly string[], flag: string): Promise<string[]> {
  if (!paths.length) throw new UsageError(`${flag}: give at least one text file or directory`);
  const files: string[] = [];
  for (const p of paths) {
    let st;
    try {
      st = await stat(p);
    } catch {
      throw new UsageError(`${flag}: ${p}: no such file or directory`);
    }
    if (st.isDirectory()) {
      const found = await listTextFiles(p);
      if (!found.length) throw new UsageError(`${flag}: ${p} has no .txt or .md files`);
      files.push(...found);
    } else files.push(p);
  }
  return files;
}

export interface TokenizedText {
  files: string[];
  ids: number[];
}

/** Reads and tokenizes `paths`, stopping once `limit` tokens are reached (all when undefined). */
export async function tokenizeText(paths: readonly string[], tok: Tokenizer, flag: string, limit?: number): Promise<TokenizedText> {
  const files = await resolveTextFiles(paths, flag);
  const ids: number[] = [];
  const used: string[] = [];
  for (const f of files) {
    if (limit !== undefined && ids.length >= limit) break;
    const text = await readFile(f, 'utf8');
    used.push(f);
    for (const id of tok.encode(used.length > 1 ? '\n' + text : text)) ids.push(id);
  }
  return { files: used, ids };
}
