// `sparsellm info`: the build, and the backends actually usable on this machine.
import type { Command } from 'commander';
import { engine } from '../core/native.js';
import { Output, formatBytes } from './ui.js';
import { VERSION } from './version.js';

export function registerInfo(program: Command): void {
  program
    .command('info')
    .description('show the build and the compute backends usable on this machine')
    .option('--json', 'print a JSON object on stdout')
    .action((opts: { json?: boolean }) => {
      const out = new Output(opts);
      const info = engine().buildInfo();
      const cuda = info.cuda;
      const result = {
        version: VERSION,
        node: process.version,
        compiler: info.compiler,
        backends: {
          cpu: { usable: true, ...info.cpu },
          cuda: { ...cuda },
        },
      };
      if (out.json) return out.result(result);
      out.say(`sparsellm ${VERSION} (node ${process.version}${info.compiler ? `, ${info.compiler}` : ''})`);
      const cpu = info.cpu;
      const features = [cpu.avx512 && 'avx512', cpu.avx512bf16 && 'avx512_bf16', cpu.avx2 && 'avx2+fma', cpu.amx && 'amx']
        .filter(Boolean)
        .join(' ');
      out.say(`cpu:  usable; ${cpu.brand}; kernels: ${cpu.isa}; threads: ${cpu.threads}; features: ${features || 'none'}`);
      if (!cuda.compiled) out.say(`cuda: not usable: ${cuda.reason}`);
      else {
        out.say(`cuda: compiled for ${cuda.archs.join(', ')} (runtime ${fmtCudaVersion(cuda.runtimeVersion)})`);
        if (!cuda.usable) out.say(`      not usable: ${cuda.reason}`);
        for (const d of cuda.devices) {
          out.say(`      [${d.index}] ${d.name} (sm_${d.computeCapability.replace('.', '')}, ${formatBytes(d.totalMemory)}, ${d.multiprocessors} SMs)`);
        }
      }
    });
}

function fmtCudaVersion(v: number): string {
  return v ? `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}` : 'none';
}
