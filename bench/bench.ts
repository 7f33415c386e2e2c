/**
 * Benchmark: nbdstream against nbdcopy (and qemu-img convert where it applies) on the same data,
 * in one run, printing times, speed ratios and peak RSS. The machine is shared and noisy: each
 * case runs every tool REPEAT times (default 3), interleaved; the best time counts, and the
 * ratio of the median times is printed too (on this machine it is the steadier of the two).
 *
 *   npm run bench [-- --repeat N] [-- --only NAME] [-- --skip NAME]
 *
 * Data lives in /dev/shm (tmpfs) when it exists, so disk speed does not enter. Servers are nbdkit
 * over a private Unix socket started per run with --run, the same for every tool.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const cli = path.join(root, 'bin/nbdstream');
const readExample = path.join(root, 'dist/examples/read-export.js');
const args = process.argv.slice(2);
const repeat = Number(args[args.indexOf('--repeat') + 1] || 3) || 3;
const only = args.includes('--only') ? args[args.indexOf('--only') + 1] : undefined;
const skip = args.includes('--skip') ? args[args.indexOf('--skip') + 1] : undefined;
const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
const dir = fs.mkdtempSync(path.join(base, 'nbdstream-bench-'));
const dense = path.join(dir, 'dense.img');

interface Run {
  seconds: number;
  rssKiB: number;
  cpu: number;
}

/** Run `sh -c script` under /usr/bin/time inside nbdkit --run; returns the client's time and RSS. */
/**
 * Run `client` (with $uri when nbdkit serves) in bash. Wall time from $EPOCHREALTIME just around
 * the command (microseconds: /usr/bin/time's %e has 10 ms steps, too coarse for the 1 TiB hole
 * cases); peak RSS and CPU from /usr/bin/time.
 */
function timed(nbdkitArgs: string[] | undefined, client: string): Run {
  const tf = path.join(dir, 'time.txt');
  const wf = path.join(dir, 'wall.txt');
  const clientSh = path.join(dir, 'client.sh');
  // (the radix character follows the locale: made a point)
  fs.writeFileSync(clientSh, `s=\${EPOCHREALTIME/,/.}\n${client}\nrc=$?\ne=\${EPOCHREALTIME/,/.}\necho "$s $e" > ${wf}\nexit $rc\n`);
  const script = `export uri; /usr/bin/time -o ${tf} -f '%e %M %U %S' bash ${clientSh}`;
  const r = nbdkitArgs
    ? spawnSync('nbdkit', ['-U', '-', '--exit-with-parent', ...nbdkitArgs, '--run', script], { stdio: ['ignore', 'ignore', 'pipe'], maxBuffer: 1 << 24 })
    : spawnSync('sh', ['-c', script], { stdio: ['ignore', 'ignore', 'pipe'], maxBuffer: 1 << 24 });
  if (r.status !== 0) throw new Error(`benchmark command failed (${client}): ${r.stderr.toString().trim()}`);
  const [, m, u, s] = fs.readFileSync(tf, 'utf8').trim().split('\n').pop()!.split(' ').map(Number);
  const [start, end] = fs.readFileSync(wf, 'utf8').trim().split(' ').map(Number);
  return { seconds: end - start, rssKiB: m, cpu: u + s };
}

interface Case {
  name: string;
  /** nbdkit arguments (the command gets $uri), or none: the command starts its own server. */
  server?: string[];
  bytes: number;
  nbdstream: string;
  nbdcopy: string;
  qemuImg?: string;
  before?: () => void;
  /** Appended to the case name in the table (e.g. bytes through a pipe, read after the runs). */
  note?: () => string;
}

const GiB = 2 ** 30;
const out = path.join(dir, 'out.img');
const hole = path.join(dir, 'hole.img');
const TiB = 2 ** 40;
const rmOut = () => fs.rmSync(out, { force: true });
const cases: Case[] = [
  {
    name: 'read-export 2G dense (example) vs nbdcopy → null:',
    server: ['file', dense],
    bytes: 2 * GiB,
    nbdstream: `node ${readExample} "$uri" 4194304 16 4`,
    nbdcopy: 'nbdcopy "$uri" null:',
  },
  {
    name: 'dense 2G NBD → null:',
    server: ['file', dense],
    bytes: 2 * GiB,
    nbdstream: `${cli} "$uri" null:`,
    nbdcopy: 'nbdcopy "$uri" null:',
  },
  {
    name: 'dense 2G NBD → file (tmpfs)',
    server: ['file', dense],
    bytes: 2 * GiB,
    nbdstream: `${cli} "$uri" ${out}`,
    nbdcopy: `nbdcopy "$uri" ${out}`,
    qemuImg: `qemu-img convert -q -f raw -O raw -m 16 -W "$uri" ${out}`,
    before: rmOut,
  },
  {
    name: 'sparse-random 16G 5% NBD → null:',
    server: ['sparse-random', '16G', 'percent=5', 'seed=1'],
    bytes: 16 * GiB,
    nbdstream: `${cli} "$uri" null:`,
    nbdcopy: 'nbdcopy "$uri" null:',
  },
  {
    name: 'sparse-random 16G 5% NBD → file (tmpfs)',
    server: ['sparse-random', '16G', 'percent=5', 'seed=1'],
    bytes: 16 * GiB,
    nbdstream: `${cli} "$uri" ${out}`,
    nbdcopy: `nbdcopy "$uri" ${out}`,
    before: rmOut,
  },
  {
    name: 'sparse-random 16G 5% NBD → NBD (nbdkit memory)',
    server: ['sparse-random', '16G', 'percent=5', 'seed=1'],
    bytes: 16 * GiB,
    nbdstream: `${cli} -- "$uri" [ nbdkit memory 16G ]`,
    nbdcopy: 'nbdcopy -- "$uri" [ nbdkit memory 16G ]',
  },
  {
    name: 'sparse-random 4G 30%, 40k short extents → null:',
    server: ['sparse-random', '4G', 'percent=30', 'runlength=65536', 'seed=1'],
    bytes: 4 * GiB,
    nbdstream: `${cli} "$uri" null:`,
    nbdcopy: 'nbdcopy "$uri" null:',
  },
  {
    name: 'sparse-random 4G 30%, 40k short extents → file (tmpfs)',
    server: ['sparse-random', '4G', 'percent=30', 'runlength=65536', 'seed=1'],
    bytes: 4 * GiB,
    nbdstream: `${cli} "$uri" ${out}`,
    nbdcopy: `nbdcopy "$uri" ${out}`,
    before: rmOut,
  },
  {
    name: 'dense 2G file → NBD (nbdkit memory)',
    bytes: 2 * GiB,
    nbdstream: `${cli} -- ${dense} [ nbdkit memory 2G ]`,
    nbdcopy: `nbdcopy -- ${dense} [ nbdkit memory 2G ]`,
  },
  {
    name: 'dense 2G NBD → NBD (nbdkit memory)',
    server: ['file', dense],
    bytes: 2 * GiB,
    nbdstream: `${cli} -- "$uri" [ nbdkit memory 2G ]`,
    nbdcopy: 'nbdcopy -- "$uri" [ nbdkit memory 2G ]',
  },
  {
    name: '1T hole (nbdkit file) → null:',
    server: ['file', hole],
    bytes: TiB,
    nbdstream: `${cli} "$uri" null:`,
    nbdcopy: 'nbdcopy "$uri" null:',
  },
  {
    name: '1T hole (nbdkit file) → fresh file',
    server: ['file', hole],
    bytes: TiB,
    nbdstream: `${cli} "$uri" ${out}`,
    nbdcopy: `nbdcopy "$uri" ${out}`,
    before: rmOut,
  },
  {
    name: '1T hole (qemu-nbd) → null:',
    bytes: TiB,
    nbdstream: `${cli} -- [ qemu-nbd -r -f raw ${hole} ] null:`,
    nbdcopy: `nbdcopy -- [ qemu-nbd -r -f raw ${hole} ] null:`,
  },
  {
    name: '1T hole (nbdkit memory, server-bound) → null:',
    server: ['memory', '1T'],
    bytes: TiB,
    nbdstream: `${cli} "$uri" null:`,
    nbdcopy: 'nbdcopy "$uri" null:',
  },
  {
    name: 'qemu-nbd 4G 5% data --no-extents → null: (OFFSET_HOLE)',
    bytes: 4 * GiB,
    nbdstream: `${cli} --no-extents -- [ qemu-nbd -r -f raw ${path.join(dir, 'sparse4g.img')} ] null:`,
    nbdcopy: `nbdcopy --no-extents -- [ qemu-nbd -r -f raw ${path.join(dir, 'sparse4g.img')} ] null:`,
  },
];

/** A pipeline stage that counts the bytes through it into FILE (dd's "N bytes … copied" line). */
const counted = (file: string) => `dd bs=1M 2>${file}`;
/** The byte count a `counted` stage wrote, in MiB. */
function pipeMiB(file: string): string {
  const m = /^(\d+) bytes/m.exec(fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '');
  return m ? `${(Number(m[1]) / 2 ** 20).toFixed(1)} MiB` : '?';
}
const pipeFile = (tool: string) => path.join(dir, `pipe-${tool}.txt`);
const pipeNote = (...tools: string[]) => () => ` [through the pipe: ${tools.map((t) => `${t} ${pipeMiB(pipeFile(t))}`).join(', ')}]`;
// 16 GiB, 5 % data, NBD → pipe → NBD: a raw pipe (nbdstream and nbdcopy alike) carries every
// byte; the extent pipe (docs/extent-stream.md) carries the data and a few records.
cases.push(
  {
    name: 'sparse-random 16G 5% NBD → raw pipe → NBD (memory)',
    server: ['sparse-random', '16G', 'percent=5', 'seed=1'],
    bytes: 16 * GiB,
    nbdstream: `${cli} "$uri" - | ${counted(pipeFile('nbdstream-raw'))} | ${cli} -- - [ nbdkit memory 16G ]`,
    nbdcopy: `nbdcopy "$uri" - | ${counted(pipeFile('nbdcopy'))} | nbdcopy -- - [ nbdkit memory 16G ]`,
    note: pipeNote('nbdstream-raw', 'nbdcopy'),
  },
  {
    name: 'sparse-random 16G 5% NBD → extents pipe → NBD (memory)',
    server: ['sparse-random', '16G', 'percent=5', 'seed=1'],
    bytes: 16 * GiB,
    nbdstream: `${cli} "$uri" - --pipe-format=extents | ${counted(pipeFile('nbdstream-extents'))} | ${cli} -- - [ nbdkit memory 16G ]`,
    nbdcopy: `nbdcopy "$uri" - | ${counted(pipeFile('nbdcopy'))} | nbdcopy -- - [ nbdkit memory 16G ]`,
    note: pipeNote('nbdstream-extents', 'nbdcopy'),
  },
);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

function fmt(r: Run | undefined): string {
  return r ? `${r.seconds.toFixed(r.seconds < 1 ? 3 : 2)} s` : '-';
}

function main(): void {
  if (!fs.existsSync(readExample)) throw new Error('run `npm run build` first');
  execFileSync('sh', ['-c', `head -c ${2 * GiB} /dev/urandom > ${dense}`]);
  execFileSync('truncate', ['-s', String(TiB), hole]);
  // 4 GiB with 5 % data: 1 MiB of random data every 20 MiB
  const s4 = path.join(dir, 'sparse4g.img');
  execFileSync('truncate', ['-s', String(4 * GiB), s4]);
  execFileSync('sh', ['-c', `for i in $(seq 0 203); do dd if=${dense} of=${s4} bs=1M count=1 skip=$i seek=$((i*20)) conv=notrunc status=none; done`]);
  const rows: string[][] = [['case', 'nbdstream', 'nbdcopy', 'qemu-img', 'speed vs nbdcopy', 'median ratio', 'nbdstream RSS', 'nbdstream CPU/GiB', 'nbdcopy CPU/GiB']];
  for (const c of cases) {
    if ((only && !c.name.includes(only)) || (skip && c.name.includes(skip))) continue;
    const best: Record<string, Run | undefined> = {};
    const times: Record<string, number[]> = { nbdstream: [], nbdcopy: [] };
    for (let i = 0; i < repeat; i++) {
      for (const [tool, cmd] of [
        ['nbdstream', c.nbdstream],
        ['nbdcopy', c.nbdcopy],
        ['qemu-img', c.qemuImg],
      ] as const) {
        if (!cmd) continue;
        c.before?.();
        const r = timed(c.server, cmd);
        if (!best[tool] || r.seconds < best[tool]!.seconds) best[tool] = r;
        times[tool]?.push(r.seconds);
      }
    }
    const s = best.nbdstream!;
    const n = best.nbdcopy!;
    const gib = c.bytes / GiB;
    rows.push([
      c.name + (c.note?.() ?? ''),
      fmt(s),
      fmt(n),
      fmt(best['qemu-img']),
      `${(n.seconds / Math.max(s.seconds, 0.005)).toFixed(2)}×`,
      `${(median(times.nbdcopy) / Math.max(median(times.nbdstream), 0.005)).toFixed(2)}×`,
      `${(s.rssKiB / 1024).toFixed(0)} MiB`,
      `${(s.cpu / gib).toFixed(2)} s`,
      `${(n.cpu / gib).toFixed(2)} s`,
    ]);
    process.stderr.write(`done: ${c.name}\n`);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  for (const r of rows) process.stdout.write(r.map((x, i) => x.padEnd(widths[i])).join('  ') + '\n');
  process.stdout.write(`(best of ${repeat}; "speed vs nbdcopy" = nbdcopy time / nbdstream time, > 1 is faster; "median ratio" the same for the median times)\n`);
}

try {
  main();
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
