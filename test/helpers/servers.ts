/**
 * Real NBD servers for tests: nbdkit, qemu-nbd and nbd-server, each started on a private Unix
 * socket in a temporary directory and stopped by the returned stop(). Nothing here is a mock.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash } from 'node:crypto';

export interface Server {
  uri: string;
  socket: string;
  dir: string;
  /** nbdkit --filter=log output, when asked for. */
  logFile?: string;
  proc?: ChildProcess;
  pid?: number;
  stop(): Promise<void>;
}

export function tmpDir(prefix = 'nbdstream-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

async function waitFor(cond: () => boolean, what: string, proc?: ChildProcess, stderr?: () => string, ms = 15000): Promise<void> {
  const until = Date.now() + ms;
  while (!cond()) {
    if (proc && proc.exitCode !== null) throw new Error(`${what} exited with ${proc.exitCode}: ${stderr?.() ?? ''}`);
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}: ${stderr?.() ?? ''}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function stopProc(proc: ChildProcess, dir: string): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      fs.rmSync(dir, { recursive: true, force: true });
      resolve();
    };
    if (proc.exitCode !== null || proc.signalCode !== null) return done();
    proc.once('exit', done);
    proc.kill('SIGTERM');
    setTimeout(() => proc.kill('SIGKILL'), 3000).unref();
  });
}

export interface NbdkitOptions {
  /** Filters, in order (each becomes --filter=NAME). */
  filters?: string[];
  /** Attach --filter=log with a log file (the log filter goes first, nearest the client). */
  log?: boolean;
  readOnly?: boolean;
  /** Extra nbdkit options placed before the plugin (e.g. --tls=require). */
  options?: string[];
  exportName?: string;
  /** URI scheme/query additions, e.g. { scheme: 'nbds+unix', query: 'tls-psk-file=...' }. */
  scheme?: string;
  query?: string;
  user?: string;
}

/** Start `nbdkit [options] PLUGIN ARGS...` on a private Unix socket. */
export async function nbdkit(plugin: string, args: string[] = [], o: NbdkitOptions = {}): Promise<Server> {
  const dir = tmpDir();
  const socket = path.join(dir, 'sock');
  const pidFile = path.join(dir, 'pid');
  const logFile = o.log ? path.join(dir, 'log') : undefined;
  const filters = [...(o.log ? ['log'] : []), ...(o.filters ?? [])];
  const argv = ['-f', '-U', socket, '-P', pidFile, ...(o.readOnly ? ['-r'] : []), ...(o.options ?? []), ...filters.map((f) => `--filter=${f}`), plugin, ...args];
  if (logFile) argv.push(`logfile=${logFile}`);
  const proc = spawn('nbdkit', argv, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  await waitFor(() => fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '', 'nbdkit', proc, () => stderr);
  const scheme = o.scheme ?? 'nbd+unix';
  const user = o.user ? `${o.user}@` : '';
  const uri = `${scheme}://${user}/${o.exportName ?? ''}?socket=${socket}${o.query ? '&' + o.query : ''}`;
  return { uri, socket, dir, logFile, proc, pid: proc.pid, stop: () => stopProc(proc, dir) };
}

export interface EvalTarget extends Server {
  /** The logged calls, "pwrite COUNT OFFSET FLAGS" / "zero …" / "trim …", sorted by offset. */
  calls(): string[];
}

/**
 * A writable nbdkit eval export of `size` bytes (any size nbdkit reads, e.g. "7E") that logs
 * every pwrite, zero and trim call and reads as zeroes. `extra` follows the plugin's arguments
 * (e.g. a filter's parameters); its stop() also removes the log.
 */
export async function evalTarget(size: string | number, o: NbdkitOptions = {}, extra: string[] = []): Promise<EvalTarget> {
  const dir = tmpDir('nbdstream-eval-');
  const log = path.join(dir, 'calls');
  fs.writeFileSync(log, '');
  const s = await nbdkit(
    'eval',
    [
      `get_size=echo ${size}`,
      'can_write=exit 0',
      'can_zero=exit 0',
      'can_trim=exit 0',
      `pwrite=cat >/dev/null; echo "pwrite $3 $4 $5" >> ${log}`,
      `zero=echo "zero $3 $4 $5" >> ${log}`,
      `trim=echo "trim $3 $4 $5" >> ${log}`,
      'pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none',
      ...extra,
    ],
    o,
  );
  const calls = () =>
    fs
      .readFileSync(log, 'utf8')
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean)
      .sort((a, b) => Number(a.split(' ')[2]) - Number(b.split(' ')[2]));
  return { ...s, calls, stop: async () => (await s.stop(), fs.rmSync(dir, { recursive: true, force: true })) };
}

/** Start `qemu-nbd -f FORMAT -t FILE` (or `--image-opts OPTIONS`) on a private Unix socket. */
export async function qemuNbd(file: string, o: { format?: string; readOnly?: boolean; extra?: string[]; imageOpts?: boolean } = {}): Promise<Server> {
  const dir = tmpDir();
  const socket = path.join(dir, 'sock');
  const argv = [...(o.imageOpts ? ['--image-opts'] : ['-f', o.format ?? 'raw']), '-k', socket, '-t', '-e', '8', '--cache=writeback', ...(o.readOnly ? ['-r'] : []), ...(o.extra ?? []), file];
  const proc = spawn('qemu-nbd', argv, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  await waitFor(() => fs.existsSync(socket), 'qemu-nbd', proc, () => stderr);
  await waitForConnect(socket);
  return { uri: `nbd+unix:///?socket=${socket}`, socket, dir, proc, pid: proc.pid, stop: () => stopProc(proc, dir) };
}

export function waitForConnect(socket: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let tries = 0;
    const attempt = () => {
      const s = net.connect(socket);
      s.once('connect', () => {
        s.destroy();
        resolve();
      });
      s.once('error', (e) => {
        if (++tries > 200) reject(e);
        else setTimeout(attempt, 25);
      });
    };
    attempt();
  });
}

/** Start nbd-server (it daemonizes) exporting FILE as export "disk" on a private Unix socket. */
export async function nbdServer(file: string, o: { readOnly?: boolean } = {}): Promise<Server> {
  const dir = tmpDir();
  const socket = path.join(dir, 'sock');
  const pidFile = path.join(dir, 'pid');
  const port = await freePort();
  fs.writeFileSync(
    path.join(dir, 'config'),
    `[generic]\nunixsock = ${socket}\nlistenaddr = 127.0.0.1\nport = ${port}\n[disk]\nexportname = ${file}\nreadonly = ${o.readOnly ? 'true' : 'false'}\n`,
  );
  execFileSync('nbd-server', ['-C', path.join(dir, 'config'), '-p', pidFile], { stdio: 'ignore' });
  await waitFor(() => fs.existsSync(pidFile) && fs.existsSync(socket), 'nbd-server');
  await waitForConnect(socket);
  const pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
  return {
    uri: `nbd+unix:///disk?socket=${socket}`,
    socket,
    dir,
    pid,
    stop: async () => {
      try {
        process.kill(pid, 'SIGTERM');
      } catch {
        /* already gone */
      }
      const until = Date.now() + 3000;
      while (Date.now() < until) {
        try {
          process.kill(pid, 0);
        } catch {
          break;
        }
        await new Promise((r) => setTimeout(r, 20));
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
    srv.on('error', reject);
  });
}

export function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** sha256 of an export as nbdcopy (libnbd) reads it: the independent reference. */
export function nbdcopyHash(uri: string): string {
  const out = execFileSync('sh', ['-c', 'nbdcopy "$1" - | sha256sum', 'sh', uri], { maxBuffer: 1 << 20 });
  return out.toString().split(' ')[0];
}

/** Lines of an nbdkit log filter file naming one of the given request kinds. */
export function logLines(file: string, kinds = ['Read', 'Write', 'Zero', 'Trim', 'Flush', 'Extents']): string[] {
  return fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => kinds.some((k) => new RegExp(`\\b${k} id=`).test(l)));
}
