/**
 * Benchmark: nbdstream against nbdcopy (and qemu-img convert where it applies) on the same data,
 * in one run. For each case and each tool it prints the wall time, and the client's and the
 * server's CPU time and peak RSS side by side: on a small machine the server's cost is ours.
 *
 *   npm run bench [-- --repeat N] [-- --only NAME] [-- --skip NAME]
 *
 * The machine is shared and noisy: each case runs the tools in interleaved pairs (A B A B …,
 * REPEAT pairs, default 5). The ratio is the median of the per-pair ratios (nbdcopy time /
 * nbdstream time: > 1 is faster), which holds when the machine's speed drifts during the run;
 * the ratio of the best times is a second column. CPU and RSS are medians over the runs.
 *
 * Every server is started by the benchmark, afresh for each run, on a private Unix socket:
 * nbdkit (foreground), qemu-nbd (persistent) or nbd-server (it forks a process per client,
 * which it reaps, so the parent's children's CPU counts them). Server CPU is read from
 * /proc/PID/stat (self + reaped children) before it is stopped; its peak RSS is the largest
 * VmHWM seen among the server and its child processes, sampled every 20 ms. The client runs
 * under /usr/bin/time (CPU, peak RSS); its wall time is bash's $EPOCHREALTIME around it.
 *
 * Data lives in /dev/shm (tmpfs) when it exists, so disk speed does not enter.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const cli = path.join(root, 'bin/nbdstream');
const readExample = path.join(root, 'dist/examples/read-export.js');
const args = process.argv.slice(2);
const opt = (name: string): string | undefined => (args.includes(name) ? args[args.indexOf(name) + 1] : undefined);
const repeat = Number(opt('--repeat') ?? 5) || 5;
const only = opt('--only');
const skip = opt('--skip');
const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
const dir = fs.mkdtempSync(path.join(base, 'nbdstream-bench-'));
const TICK = 100; // clock ticks per second in /proc/PID/stat (USER_HZ, 100 on Linux)

const GiB = 2 ** 30;
const TiB = 2 ** 40;
const dense = path.join(dir, 'dense.img');
const hole = path.join(dir, 'hole.img');
const hole16 = path.join(dir, 'hole16.img');
const sparse4g = path.join(dir, 'sparse4g.img');
const out = path.join(dir, 'out.img');

/** What one run cost: wall seconds; CPU seconds and peak RSS (KiB) of the client and the servers. */
interface Cost {
  seconds: number;
  clientCpu: number;
  clientRss: number;
  serverCpu: number;
  serverRss: number;
}

/** A server the benchmark starts: its command on socket SOCK, and the URI to reach it. */
interface ServerSpec {
  label: string;
  start(sock: string): { cmd: string[]; uri: string; pidFile?: string };
}

const nbdkit = (...a: string[]): ServerSpec => ({
  label: 'nbdkit ' + a[0],
  start: (sock) => ({ cmd: ['nbdkit', '-f', '-U', sock, ...a], uri: `nbd+unix:///?socket=${sock}` }),
});
const qemuNbd = (file: string, readOnly = true): ServerSpec => ({
  label: 'qemu-nbd',
  start: (sock) => ({ cmd: ['qemu-nbd', '-t', '-e', '16', '-f', 'raw', ...(readOnly ? ['-r'] : []), '-k', sock, file], uri: `nbd+unix:///?socket=${sock}` }),
});
const nbdServer = (file: string): ServerSpec => ({
  label: 'nbd-server',
  start(sock) {
    const conf = `${sock}.conf`;
    fs.writeFileSync(conf, `[generic]\nunixsock = ${sock}\n[disk]\nexportname = ${file}\nreadonly = true\n`);
    return { cmd: ['nbd-server', '-C', conf, '-p', `${sock}.pid`], uri: `nbd+unix:///disk?socket=${sock}`, pidFile: `${sock}.pid` };
  },
});

/** A started server; stop() returns its CPU seconds and peak RSS (KiB). */
class RunningServer {
  private peak = 0;
  private timer?: NodeJS.Timeout;
  constructor(
    readonly uri: string,
    private readonly pid: number,
    private readonly child: ChildProcess,
  ) {
    this.timer = setInterval(() => this.sample(), 20);
  }

  static async start(spec: ServerSpec, sock: string): Promise<RunningServer> {
    const { cmd, uri, pidFile } = spec.start(sock);
    // (stderr dropped: servers complain of the benchmark's probe connection; a failing server
    // shows as a failing client)
    const child = spawn(cmd[0], cmd.slice(1), { stdio: 'ignore' });
    await waitForSocket(sock);
    const pid = pidFile ? Number(fs.readFileSync(pidFile, 'utf8').trim()) : child.pid!;
    return new RunningServer(uri, pid, child);
  }

  /** The server and its descendants. */
  private tree(pid = this.pid): number[] {
    let kids: number[] = [];
    try {
      kids = fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
    } catch {
      /* gone */
    }
    return [pid, ...kids.flatMap((k) => this.tree(k))];
  }

  private sample(): void {
    for (const p of this.tree()) {
      try {
        const m = /VmHWM:\s+(\d+)/.exec(fs.readFileSync(`/proc/${p}/status`, 'utf8'));
        if (m) this.peak = Math.max(this.peak, Number(m[1]));
      } catch {
        /* gone */
      }
    }
  }

  async stop(): Promise<{ cpu: number; rss: number }> {
    // let the server reap the processes that served the client (nbd-server) before reading
    await new Promise((r) => setTimeout(r, 60));
    this.sample();
    clearInterval(this.timer);
    const f = fs.readFileSync(`/proc/${this.pid}/stat`, 'utf8').split(') ')[1].split(' ');
    // fields 14-17 of stat (utime stime cutime cstime) are 11-14 after "pid (comm) "
    const cpu = (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / TICK;
    const exited = new Promise((r) => (this.child.exitCode !== null ? r(0) : this.child.once('exit', r)));
    process.kill(this.pid, 'SIGTERM');
    await exited;
    if (this.pid !== this.child.pid) await waitGone(this.pid);
    return { cpu, rss: this.peak };
  }
}

async function waitForSocket(sock: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (fs.existsSync(sock)) {
      const ok = await new Promise<boolean>((r) => {
        const s = net.connect(sock);
        s.once('connect', () => (s.destroy(), r(true)));
        s.once('error', (e) => (process.env.BENCH_DEBUG && console.error(e.message), r(false)));
      });
      if (ok) return;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`server on ${sock} did not start (${fs.existsSync(sock) ? "not answering" : "no socket"})`);
}

async function waitGone(pid: number): Promise<void> {
  for (let i = 0; i < 300; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * Run `client` in bash with $uri (the source server's URI) and $dst (the target server's), under
 * /usr/bin/time; wall time from $EPOCHREALTIME just around the command (microseconds).
 */
async function timed(c: Case, client: string): Promise<Cost> {
  const tf = path.join(dir, 'time.txt');
  const wf = path.join(dir, 'wall.txt');
  const sh = path.join(dir, 'client.sh');
  // (the radix character follows the locale: made a point)
  fs.writeFileSync(sh, `s=\${EPOCHREALTIME/,/.}\n${client}\nrc=$?\ne=\${EPOCHREALTIME/,/.}\necho "$s $e" > ${wf}\nexit $rc\n`);
  const servers: RunningServer[] = [];
  const env: Record<string, string> = { ...(process.env as Record<string, string>) };
  try {
    for (const [name, spec] of [['uri', c.source], ['dst', c.target]] as const) {
      if (!spec) continue;
      const sock = path.join(dir, `${name}.sock`);
      fs.rmSync(sock, { force: true }); // a server stopped by a signal may leave its socket
      const s = await RunningServer.start(spec, sock);
      servers.push(s);
      env[name] = s.uri;
    }
    const child = spawn('/usr/bin/time', ['-o', tf, '-f', '%M %U %S', 'bash', sh], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    const status = await new Promise<number | null>((r) => child.once('exit', r));
    if (status !== 0) throw new Error(`benchmark command failed (${client}): ${stderr.trim()}`);
    const [m, u, s] = fs.readFileSync(tf, 'utf8').trim().split('\n').pop()!.split(' ').map(Number);
    const [start, end] = fs.readFileSync(wf, 'utf8').trim().split(' ').map(Number);
    let serverCpu = 0;
    let serverRss = 0;
    for (const srv of servers.splice(0)) {
      const r = await srv.stop();
      serverCpu += r.cpu;
      serverRss += r.rss;
    }
    return { seconds: end - start, clientCpu: u + s, clientRss: m, serverCpu, serverRss };
  } finally {
    for (const srv of servers) await srv.stop().catch(() => undefined);
  }
}

interface Case {
  name: string;
  /** The source server ($uri), if any. */
  source?: ServerSpec;
  /** The target server ($dst), if any. */
  target?: ServerSpec;
  nbdstream: string;
  nbdcopy: string;
  qemuImg?: string;
  before?: () => void;
  /** Appended to the case name in the table (e.g. bytes through a pipe, read after the runs). */
  note?: () => string;
}

const rmOut = () => fs.rmSync(out, { force: true });
const sparseRandom16 = nbdkit('sparse-random', '16G', 'percent=5', 'seed=1');
const short40k = nbdkit('sparse-random', '4G', 'percent=30', 'runlength=65536', 'seed=1');
const toNull = (name: string, source: ServerSpec, extra = ''): Case => ({
  name,
  source,
  nbdstream: `${cli} ${extra} "$uri" null:`,
  nbdcopy: `nbdcopy ${extra} "$uri" null:`,
});
const cases: Case[] = [
  toNull('dense 1G (nbdkit file) → null:', nbdkit('file', dense)),
  toNull('dense 1G (qemu-nbd) → null:', qemuNbd(dense)),
  toNull('dense 1G (nbd-server) → null:', nbdServer(dense)),
  {
    name: 'read-export example, dense 1G (nbdkit file) vs nbdcopy → null:',
    source: nbdkit('file', dense),
    nbdstream: `node ${readExample} "$uri" 262144 16 4`,
    nbdcopy: 'nbdcopy "$uri" null:',
  },
  {
    name: 'dense 1G (nbdkit file) → file',
    source: nbdkit('file', dense),
    nbdstream: `${cli} "$uri" ${out}`,
    nbdcopy: `nbdcopy "$uri" ${out}`,
    qemuImg: `qemu-img convert -q -f raw -O raw -m 16 -W "$uri" ${out}`,
    before: rmOut,
  },
  {
    name: 'dense 1G file → NBD (nbdkit memory)',
    target: nbdkit('memory', '1G'),
    nbdstream: `${cli} ${dense} "$dst"`,
    nbdcopy: `nbdcopy ${dense} "$dst"`,
  },
  {
    name: 'dense 1G (nbdkit file) → NBD (nbdkit memory)',
    source: nbdkit('file', dense),
    target: nbdkit('memory', '1G'),
    nbdstream: `${cli} "$uri" "$dst"`,
    nbdcopy: 'nbdcopy "$uri" "$dst"',
  },
  {
    name: 'dense 1G (qemu-nbd) → NBD (qemu-nbd)',
    source: qemuNbd(dense),
    target: qemuNbd(out, false),
    nbdstream: `${cli} "$uri" "$dst"`,
    nbdcopy: 'nbdcopy "$uri" "$dst"',
    before: () => execFileSync('truncate', ['-s', String(GiB), out]),
  },
  toNull('sparse-random 16G 5% → null:', sparseRandom16),
  {
    name: 'sparse-random 16G 5% → fresh file',
    source: sparseRandom16,
    nbdstream: `${cli} "$uri" ${out}`,
    nbdcopy: `nbdcopy "$uri" ${out}`,
    before: rmOut,
  },
  {
    name: 'sparse-random 16G 5% → NBD (nbdkit memory)',
    source: sparseRandom16,
    target: nbdkit('memory', '16G'),
    nbdstream: `${cli} "$uri" "$dst"`,
    nbdcopy: 'nbdcopy "$uri" "$dst"',
  },
  toNull('sparse-random 4G 30%, 40k short extents → null:', short40k),
  {
    name: 'sparse-random 4G 30%, 40k short extents → file',
    source: short40k,
    nbdstream: `${cli} "$uri" ${out}`,
    nbdcopy: `nbdcopy "$uri" ${out}`,
    before: rmOut,
  },
  toNull('1T hole (nbdkit file) → null:', nbdkit('file', hole)),
  {
    name: '1T hole (nbdkit file) → fresh file',
    source: nbdkit('file', hole),
    nbdstream: `${cli} "$uri" ${out}`,
    nbdcopy: `nbdcopy "$uri" ${out}`,
    before: rmOut,
  },
  toNull('1T hole (qemu-nbd) → null:', qemuNbd(hole)),
  toNull('1T hole (nbdkit memory, server-bound) → null:', nbdkit('memory', '1T')),
  toNull('16T hole (nbdkit file) → null:', nbdkit('file', hole16)),
  toNull('4G 5% data (qemu-nbd) --no-extents → null: (OFFSET_HOLE)', qemuNbd(sparse4g), '--no-extents'),
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
    name: 'sparse-random 16G 5% → raw pipe → NBD (memory)',
    source: sparseRandom16,
    target: nbdkit('memory', '16G'),
    nbdstream: `${cli} "$uri" - | ${counted(pipeFile('nbdstream-raw'))} | ${cli} - "$dst"`,
    nbdcopy: `nbdcopy "$uri" - | ${counted(pipeFile('nbdcopy'))} | nbdcopy - "$dst"`,
    note: pipeNote('nbdstream-raw', 'nbdcopy'),
  },
  {
    name: 'sparse-random 16G 5% → extents pipe → NBD (memory)',
    source: sparseRandom16,
    target: nbdkit('memory', '16G'),
    nbdstream: `${cli} "$uri" - --pipe-format=extents | ${counted(pipeFile('nbdstream-extents'))} | ${cli} - "$dst"`,
    nbdcopy: `nbdcopy "$uri" - | ${counted(pipeFile('nbdcopy'))} | nbdcopy - "$dst"`,
    note: pipeNote('nbdstream-extents', 'nbdcopy'),
  },
);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

const secs = (x: number) => `${x.toFixed(x < 1 ? 3 : 2)}`;
const cpu = (x: number) => x.toFixed(2);
const mib = (kib: number) => (kib / 1024).toFixed(0);
/** Median of a field over runs, for two tools: "ours / theirs". */
const pairOf = (a: Cost[], b: Cost[], f: (c: Cost) => number, show: (x: number) => string) => `${show(median(a.map(f)))} / ${show(median(b.map(f)))}`;

async function main(): Promise<void> {
  if (!fs.existsSync(readExample)) throw new Error('run `npm run build` first');
  execFileSync('sh', ['-c', `head -c ${GiB} /dev/urandom > ${dense}`]);
  execFileSync('truncate', ['-s', String(TiB), hole]);
  execFileSync('truncate', ['-s', String(16 * TiB), hole16]);
  // 4 GiB with 5 % data: 1 MiB of random data every 20 MiB
  execFileSync('truncate', ['-s', String(4 * GiB), sparse4g]);
  execFileSync('sh', ['-c', `for i in $(seq 0 203); do dd if=${dense} of=${sparse4g} bs=1M count=1 skip=$((i % 1024)) seek=$((i*20)) conv=notrunc status=none; done`]);
  const rows: string[][] = [
    [
      'case',
      'nbdstream',
      'nbdcopy',
      'qemu-img',
      'ratio (median of pairs)',
      'ratio (best)',
      'client CPU s ours/nbdcopy',
      'server CPU s ours/nbdcopy',
      'client RSS MiB ours/nbdcopy',
      'server RSS MiB ours/nbdcopy',
    ],
  ];
  for (const c of cases) {
    if ((only && !c.name.includes(only)) || (skip && c.name.includes(skip))) continue;
    const runs: Record<string, Cost[]> = { nbdstream: [], nbdcopy: [], 'qemu-img': [] };
    for (let i = 0; i < repeat; i++) {
      for (const [tool, cmd] of [
        ['nbdstream', c.nbdstream],
        ['nbdcopy', c.nbdcopy],
        ['qemu-img', c.qemuImg],
      ] as const) {
        if (!cmd) continue;
        c.before?.();
        runs[tool].push(await timed(c, cmd));
      }
    }
    const s = runs.nbdstream;
    const n = runs.nbdcopy;
    const best = (rs: Cost[]) => Math.min(...rs.map((r) => r.seconds));
    const pairRatios = s.map((r, i) => n[i].seconds / Math.max(r.seconds, 0.0005));
    rows.push([
      c.name + (c.note?.() ?? ''),
      `${secs(median(s.map((r) => r.seconds)))} s`,
      `${secs(median(n.map((r) => r.seconds)))} s`,
      runs['qemu-img'].length ? `${secs(median(runs['qemu-img'].map((r) => r.seconds)))} s` : '-',
      `${median(pairRatios).toFixed(2)}×`,
      `${(best(n) / Math.max(best(s), 0.0005)).toFixed(2)}×`,
      pairOf(s, n, (r) => r.clientCpu, cpu),
      c.source || c.target ? pairOf(s, n, (r) => r.serverCpu, cpu) : '-',
      pairOf(s, n, (r) => r.clientRss, mib),
      c.source || c.target ? pairOf(s, n, (r) => r.serverRss, mib) : '-',
    ]);
    process.stderr.write(`done: ${c.name}\n`);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  for (const r of rows) process.stdout.write(r.map((x, i) => x.padEnd(widths[i])).join('  ') + '\n');
  process.stdout.write(
    `(${repeat} interleaved pairs per case; times are medians. "ratio" = nbdcopy time / nbdstream time, > 1 is faster: the median of the per-pair ratios, and the ratio of the best times. ` +
      'CPU and RSS: medians over the runs, ours / nbdcopy; the server columns add up the source and target servers.)\n',
  );
}

try {
  await main();
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
