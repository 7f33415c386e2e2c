/**
 * The built-in server bounds itself against clients that do not play along: one memory budget
 * for queued replies across all clients (clients that send reads and never read the replies),
 * and a time limit for the handshake. Raw clients over real sockets, against NbdServer in this
 * process (exact byte counts) and against a `nbdstream serve` child process (its RSS).
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import type { NbdStreamError } from '../../lib/errors.js';
import { NbdClient } from '../../lib/nbd/client.js';
import { MemoryEndpoint } from '../../lib/endpoints/memory.js';
import { NbdServer } from '../../lib/nbd/server.js';
import { encodeClientFlags, encodeGo, encodeRequest } from '../../lib/nbd/encode.js';
import { NBD_CMD_READ } from '../../lib/nbd/protocol.js';
import { sha256, tmpDir, waitForConnect } from '../helpers/servers.js';
import { CLI } from '../helpers/cli.js';

const MiB = 1024 * 1024;
const dir = tmpDir('nbdstream-bounds-');
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

let cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  for (const end = Date.now() + ms; !cond(); await sleep(20)) if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
}

/**
 * A client that negotiates (simple replies), sends `n` NBD_CMD_READs of `length` bytes and never
 * reads a reply. Resolves once the requests are sent.
 */
function hog(socket: string, n: number, length: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(socket);
    cleanups.push(() => s.destroy());
    s.once('error', reject);
    s.once('data', () => {
      s.pause(); // the greeting came: from now on nothing is read
      const reqs = Array.from({ length: n }, (_, i) => encodeRequest(0, NBD_CMD_READ, i + 1, 0, length));
      s.write(Buffer.concat([encodeClientFlags(3), encodeGo('', []), ...reqs]), () => resolve(s));
    });
  });
}

/** Connect and wait for the server to close the socket; resolves with the ms it took and the bytes received. */
function silentClient(socket: string, send: Buffer = Buffer.alloc(0)): Promise<{ ms: number; bytes: number }> {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const s = net.connect(socket);
    cleanups.push(() => s.destroy());
    let bytes = 0;
    s.on('data', (d) => (bytes += d.length));
    s.on('error', reject);
    s.on('connect', () => s.write(send));
    s.on('close', () => resolve({ ms: Date.now() - start, bytes }));
  });
}

describe('NbdServer', () => {
  it('holds at most its budget plus one request per client for clients that never read replies; a polite client still reads', async () => {
    const data = randomBytes(4 * MiB);
    const server = new NbdServer(new MemoryEndpoint(Buffer.from(data)), { maxQueuedBytes: 8 * MiB });
    const socket = path.join(dir, 'budget.sock');
    await server.listen({ path: socket });
    cleanups.push(() => server.close(200));
    let peak = 0;
    const sampler = setInterval(() => (peak = Math.max(peak, server.budget.used)), 2);
    cleanups.push(() => clearInterval(sampler));

    // 3 clients × 100 reads of 1 MiB: 300 MiB if nothing held them back
    const hogs = await Promise.all([hog(socket, 100, MiB), hog(socket, 100, MiB), hog(socket, 100, MiB)]);
    await until('the budget to fill', () => server.budget.exceeded);
    await sleep(300);
    expect(peak).toBeGreaterThanOrEqual(8 * MiB);
    expect(peak).toBeLessThanOrEqual(8 * MiB + 3 * MiB + 64 * 1024); // + a little handshake

    // While the budget is exceeded a client holding nothing is still served, one request at a time.
    const c = await NbdClient.connect(`nbd+unix:///?socket=${socket}`);
    cleanups.push(() => c.close().catch(() => undefined));
    const got = await Promise.all([0, 1, 2, 3].map((i) => c.pread(i * MiB, MiB)));
    expect(sha256(Buffer.concat(got.map((r) => r.data)))).toBe(sha256(data));
    expect(peak).toBeLessThanOrEqual(8 * MiB + 4 * MiB + 64 * 1024);

    // Hanging up gives back what a client held.
    await c.close();
    for (const h of hogs) h.destroy();
    await until('the budget to drain', () => server.budget.used === 0);
  });

  it('closes clients that do not finish the handshake within handshakeLimitMs, and only those', async () => {
    const server = new NbdServer(new MemoryEndpoint(Buffer.alloc(MiB, 7)), { handshakeLimitMs: 300 });
    const socket = path.join(dir, 'limit.sock');
    await server.listen({ path: socket });
    cleanups.push(() => server.close(200));
    const errors: string[] = [];
    server.on('clientError', (e: NbdStreamError) => errors.push(`${e.code}: ${e.message}`));
    const polite = await NbdClient.connect(`nbd+unix:///?socket=${socket}`);
    cleanups.push(() => polite.close().catch(() => undefined));

    const [silent, slow] = await Promise.all([silentClient(socket), silentClient(socket, encodeClientFlags(3))]);
    for (const r of [silent, slow]) {
      expect(r.bytes).toBe(18); // the greeting, nothing else
      expect(r.ms).toBeGreaterThanOrEqual(250);
    }
    expect(errors).toEqual(['ERR_TIMEOUT: handshake not finished within 0.3 s', 'ERR_TIMEOUT: handshake not finished within 0.3 s']);
    // the client past its handshake was left alone
    expect((await polite.pread(0, 4096)).data.equals(Buffer.alloc(4096, 7))).toBe(true);
  });
});

// ------------------------------------------------------------------ nbdstream serve (a child process)

const rssKiB = (pid: number, field = 'VmRSS'): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);

async function serveChild(args: string[]): Promise<{ child: ChildProcess; socket: string; stderr: () => string }> {
  const socket = path.join(dir, `serve-${args.length}-${Date.now()}.sock`);
  const child = spawn(CLI, ['serve', '--socket', socket, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d));
  cleanups.push(() => child.kill('SIGKILL'));
  await until('serve to listen', () => fs.existsSync(socket) || child.exitCode !== null);
  // the socket file appears just before the server listens on it
  if (child.exitCode === null) await waitForConnect(socket);
  return { child, socket, stderr: () => err };
}

function nbdcopyHash(socket: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn('sh', ['-c', `nbdcopy 'nbd+unix:///?socket=${socket}' - | sha256sum`], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d));
    p.on('error', reject);
    p.on('close', (status) => (status === 0 ? resolve(out.split(' ')[0]) : reject(new Error(`nbdcopy: status ${status}`))));
  });
}

describe('nbdstream serve', () => {
  it('six clients sending 32 MiB reads and never reading the replies: RSS stays bounded, and nbdcopy still copies', async () => {
    // 64 MiB, data in its first 4 MiB; simple replies carry every byte, holes too
    const img = path.join(dir, 'hogged.img');
    const head = randomBytes(4 * MiB);
    fs.writeFileSync(img, head);
    fs.truncateSync(img, 64 * MiB);
    const { child, socket } = await serveChild(['-r', img]);
    const pid = child.pid!;
    const before = rssKiB(pid);

    // 6 × 20 reads of 32 MiB: 3.75 GiB if nothing held them back
    await Promise.all(Array.from({ length: 6 }, () => hog(socket, 20, 32 * MiB)));
    let last = 0;
    await until('the server to stop taking requests', () => {
      const now = rssKiB(pid);
      const settled = now > before + 100 * 1024 && Math.abs(now - last) < 1024;
      last = now;
      return settled;
    }, 20_000);
    const expected = sha256(Buffer.concat([head, Buffer.alloc(60 * MiB)]));
    expect(await nbdcopyHash(socket)).toBe(expected);
    // 128 MiB budget + one 32 MiB request for each client past it, over what serve needs alone
    expect(rssKiB(pid, 'VmHWM') - before).toBeLessThan(450 * 1024);
  }, 60_000);

  it('--handshake-limit: a client that sends nothing is closed by the server', async () => {
    const img = path.join(dir, 'small.img');
    fs.writeFileSync(img, Buffer.alloc(MiB, 1));
    const { socket, stderr } = await serveChild(['-v', '--handshake-limit', '1', img]);
    const r = await silentClient(socket);
    expect(r.bytes).toBe(18);
    expect(r.ms).toBeGreaterThanOrEqual(900);
    await until('the log line', () => /handshake/.test(stderr()));
    expect(stderr()).toMatch(/^nbdstream serve: client \d+: handshake not finished within 1 s$/m);
    expect(await nbdcopyHash(socket)).toBe(sha256(Buffer.alloc(MiB, 1)));
  });
});
