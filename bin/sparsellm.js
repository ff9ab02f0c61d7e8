#!/usr/bin/env node
// Tiny launcher: the CLI lives in dist/ (compiled from src/ by `npm run build:ts`).
import { main } from '../dist/cli/main.js';

main(process.argv).then(
  (code) => { process.exitCode = code; },
  (err) => { console.error(err); process.exitCode = 1; },
);
