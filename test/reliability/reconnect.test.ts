/**
 * --timeout and --retries against real nbdkit: a server that stops answering fails the copy in
 * bounded time; a server killed and restarted mid-copy is reconnected to and the copy completes
 * byte-identical.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { nbdcopyHash, nbdkit, sha256, tmpDir, type Server } from '../helpers/servers.js';
import { run } from '../helpers/cli.js';
import { randomBytes } from 'node:crypto';
import { NbdClient, retryDelay } from '../../lib/nbd/client.js';

let cleanups: Array<() => Promise<unknown> | unknown> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

/**
 * nbdkit serving FILE read-only with a read delay, on a fixed socket path (so it can be
 * restarted there); with `logfile`, nbdkit's log filter records every request and its result.
 */
function startFileServer(file: string, socket: string, pidFile: string, o: { rdelay?: string; logfile?: string } = {}): Promise<ChildProcess> {
  fs.rmSync(pidFile, { force: true });
  const log = o.logfile ? { filter: ['--filter=log'], param: [`logfile=${o.logfile}`] } : { filter: [], param: [] };
  const p = spawn('nbdkit', ['-f', '-r', '-U', socket, '-P', pidFile, ...log.filter, '--filter=delay', 'file', file, `rdelay=${o.rdelay ?? '100ms'}`, ...log.param], {
    stdio: 'ignore',
  });
  return new Promise((resolve, reject) => {
    const until = Date.now() + 10000;
    const poll = () => {
      if (fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim()) resolve(p);
      else if (Date.now() > until || p.exitCode !== null) reject(new Error('nbdkit did not start'));
      else setTimeout(poll, 10);
    };
    poll();
  });
}

describe('--timeout', () => {
  it('fails a copy whose server stops answering, in bounded time, naming the request', async () => {
    const s: Server = await nbdkit('pattern', ['64M', 'rdelay=30'], { filters: ['delay'] });
    cleanups.push(() => s.stop());
    const out = path.join(s.dir, 'out.img');
    const t = Date.now();
    const r = await run(['--timeout=1', s.uri, out]);
    expect(Date.now() - t).toBeLessThan(8000);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^nbdstream: nbd\+unix:\/\/\/\?socket=\S+: offset \d+: NBD_CMD_READ got no reply within 1 s\n$/);
  });

  it('rejects a bad --timeout value', async () => {
    const r = await run(['--timeout=soon', 'a', 'b']);
    expect(r).toMatchObject({ status: 1, stderr: 'nbdstream: --timeout: expected a number of seconds > 0, not "soon"\n' });
  });
});

describe('--retries', () => {
  it('reconnects after the server is killed and restarted mid-copy; the target is byte-identical', async () => {
    const dir = tmpDir();
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const src = path.join(dir, 'src.img');
    // 32 MiB of data with holes: 1 MiB data every 2 MiB
    const fd = fs.openSync(src, 'w');
    fs.ftruncateSync(fd, 32 << 20);
    for (let i = 0; i < 16; i++) fs.writeSync(fd, Buffer.alloc(1 << 20, i + 1), 0, 1 << 20, i * (2 << 20));
    fs.closeSync(fd);
    const socket = path.join(dir, 'sock');
    const pidFile = path.join(dir, 'pid');
    let server = await startFileServer(src, socket, pidFile);
    cleanups.push(() => server.kill('SIGKILL'));
    const out = path.join(dir, 'out.img');
    const uri = `nbd+unix:///?socket=${socket}`;
    let finished = false;
    const copying = run(['--retries=5', '--request-size=64K', '-R', '1', '-C', '1', uri, out]).finally(() => (finished = true));
    // the target file exists once the copy has connected and opened both ends
    while (!fs.existsSync(out) && !finished) await new Promise((r) => setTimeout(r, 10));
    // kill it twice while the copy runs, restarting it each time on the same socket
    for (let i = 0; i < 2; i++) {
      await new Promise((r) => setTimeout(r, 300));
      if (finished) expect(await copying).toEqual('still copying');
      server.kill('SIGKILL');
      await new Promise((r) => server.once('exit', r));
      fs.rmSync(socket, { force: true });
      server = await startFileServer(src, socket, pidFile);
    }
    const r = await copying;
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(sha256(fs.readFileSync(out))).toBe(sha256(fs.readFileSync(src)));
  });

  it('backs off 0.25, 0.5, 1, then 2 s: 3 retries span 1.75 s, 5 span 5.75 s (as --help and README say)', () => {
    const window = (n: number) => Array.from({ length: n }, (_, i) => retryDelay(i)).reduce((a, b) => a + b, 0);
    expect(Array.from({ length: 6 }, (_, i) => retryDelay(i))).toEqual([250, 500, 1000, 2000, 2000, 2000]);
    expect([window(3), window(5), window(10)]).toEqual([1750, 5750, 15750]);
  });

  // A real restart: the server is away for seconds, not milliseconds. SIGTERM is a graceful
  // stop: nbdkit answers the requests in flight with NBD_ESHUTDOWN and exits only once every
  // client connection is closed, so the copy must let go of all its connections (-C 4) and
  // retry as after a lost connection.
  it.each([
    ['SIGKILL', 1000, 3, 1],
    ['SIGKILL', 3000, 5, 1],
    ['SIGTERM', 1000, 3, 4],
  ] as const)('rides out nbdkit stopped with %s and restarted %i ms later (--retries=%i, -C %i); the target is byte-identical', async (signal, away, retries, connections) => {
    const dir = tmpDir();
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const src = path.join(dir, 'src.img');
    // 16 MiB with 4 MiB of data: 1 MiB every 4 MiB; 64 reads of 64K, one at a time
    const fd = fs.openSync(src, 'w');
    fs.ftruncateSync(fd, 16 << 20);
    for (let i = 0; i < 4; i++) fs.writeSync(fd, randomBytes(1 << 20), 0, 1 << 20, i * (4 << 20));
    fs.closeSync(fd);
    const socket = path.join(dir, 'sock');
    const pidFile = path.join(dir, 'pid');
    const logfile = path.join(dir, 'first.log');
    const rdelay = '40ms';
    let server = await startFileServer(src, socket, pidFile, { rdelay, logfile });
    cleanups.push(() => server.kill('SIGKILL'));
    const out = path.join(dir, 'out.img');
    let finished = false;
    const copying = run([`--retries=${retries}`, '--request-size=64K', '-R', '1', '-C', String(connections), '-T', String(connections), `nbd+unix:///?socket=${socket}`, out]).finally(
      () => (finished = true),
    );
    while (!fs.existsSync(out) && !finished) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, 300));
    if (finished) expect(await copying).toEqual('still copying');
    const exited = new Promise<number | null>((r) => server.once('exit', (code) => r(code)));
    server.kill(signal);
    const code = await exited;
    await new Promise((r) => setTimeout(r, away));
    fs.rmSync(socket, { force: true });
    const logfile2 = path.join(dir, 'second.log');
    server = await startFileServer(src, socket, pidFile, { rdelay, logfile: logfile2 });
    const r = await copying;
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(sha256(fs.readFileSync(out))).toBe(sha256(fs.readFileSync(src)));
    if (signal === 'SIGTERM') {
      // nbdkit answered NBD_ESHUTDOWN, and exited cleanly once every connection had closed
      expect(code).toBe(0);
      const log = fs.readFileSync(logfile, 'utf8');
      expect(log).toMatch(/ \.\.\.Read id=\d+ return=-1 error=ESHUTDOWN\n/);
      expect(log.match(/ Connect export=/g)?.length).toBe(connections);
      expect(log.match(/ Disconnect transactions=/g)?.length).toBe(connections);
    }
    // every connection came back, not only the one the next request was on
    expect(fs.readFileSync(logfile2, 'utf8').match(/ Connect export=/g)?.length).toBe(connections);
  });

  it('gives up after N retries with the connection error', async () => {
    const dir = tmpDir();
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const src = path.join(dir, 'src.img');
    fs.writeFileSync(src, Buffer.alloc(4 << 20, 1));
    const socket = path.join(dir, 'sock');
    const server = await startFileServer(src, socket, path.join(dir, 'pid'));
    cleanups.push(() => server.kill('SIGKILL'));
    const c = await NbdClient.connect(`nbd+unix:///?socket=${socket}`, { retries: 2 });
    cleanups.push(() => c.close());
    expect((await c.pread(0, 4096)).data[0]).toBe(1);
    server.kill('SIGKILL');
    await new Promise((r) => server.once('exit', r));
    const t = Date.now();
    await expect(c.pread(0, 4096)).rejects.toMatchObject({ code: 'ERR_CONNECT', message: expect.stringMatching(/^cannot connect to socket .*: (ECONNREFUSED|ENOENT)$/) });
    expect(Date.now() - t).toBeLessThan(5000);
  });

  it('with the library: a client keeps working across a restarted server', async () => {
    const s = await nbdkit('sparse-random', ['16M', 'seed=4', 'percent=50'], { readOnly: true });
    cleanups.push(() => s.stop());
    const want = nbdcopyHash(s.uri);
    const c = await NbdClient.connect(s.uri, { retries: 3 });
    cleanups.push(() => c.close());
    const buf = Buffer.alloc(16 << 20);
    await c.pread(0, 8 << 20, buf);
    expect(c.reconnects).toBe(0);
    // sparse-random with the same seed serves the same bytes after a restart
    s.proc!.kill('SIGKILL');
    await new Promise((r) => s.proc!.once('exit', r));
    const again = await nbdkit('sparse-random', ['16M', 'seed=4', 'percent=50'], { readOnly: true });
    cleanups.push(() => again.stop());
    fs.rmSync(s.socket, { force: true });
    fs.symlinkSync(again.socket, s.socket);
    await c.pread(8 << 20, 8 << 20, buf.subarray(8 << 20));
    expect(c.reconnects).toBe(1);
    expect(sha256(buf)).toBe(want);
  });
});
