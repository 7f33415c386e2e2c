/**
 * The built-in NBD server (lib/nbd/server.ts, `nbdstream serve`) against real clients over real
 * sockets: nbdinfo, nbdcopy (libnbd), qemu-img and qemu-io (QEMU's NBD client), our NbdClient,
 * and raw sockets for what no polite client sends. Fault injection is checked with NbdClient.
 *
 * External tools run with async spawn (never execFileSync): the server lives in this process and
 * must keep answering while they run.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { NbdStreamError } from '../../lib/errors.js';
import { NbdClient } from '../../lib/nbd/client.js';
import { NbdConnection } from '../../lib/nbd/connection.js';
import { parseNbdUri } from '../../lib/nbd/uri.js';
import { MemoryEndpoint } from '../../lib/endpoints/memory.js';
import { NbdServer, type ExportDefinition, type NbdServerOptions, type Violation } from '../../lib/nbd/server.js';
import { SparseMemoryEndpoint, openServedEndpoint } from '../../lib/nbd/server-export.js';
import type { Endpoint } from '../../lib/endpoints/endpoint.js';
import { encodeClientFlags, encodeGo, encodeOption, encodeRequest } from '../../lib/nbd/encode.js';
import * as P from '../../lib/nbd/protocol.js';
import { sha256, tmpDir } from '../helpers/servers.js';
import { clientCertDir, makeCa, pskAdd, serverCertDir } from '../helpers/tls.js';
import { CLI, run as runCli } from '../helpers/cli.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
/** Data regions of the sparse test file; the rest is holes. */
const DATA = [
  { offset: 0, length: 64 * 1024 },
  { offset: 10 * MiB, length: 4096 },
  { offset: 40 * MiB, length: MiB },
];

let dir: string;
let img: string; // sparse source image
let imgBytes: Buffer;
let pskFile: string;
let wrongPskFile: string;
let certDir: string; // server: ca-cert.pem, server-cert.pem, server-key.pem
let clientDir: string; // client: ca-cert.pem, client-cert.pem, client-key.pem
let noCertDir: string; // client: ca-cert.pem only

beforeAll(() => {
  dir = tmpDir('nbdstream-server-');
  img = path.join(dir, 'src.img');
  imgBytes = Buffer.alloc(SIZE);
  for (const d of DATA) randomBytes(d.length).copy(imgBytes, d.offset);
  fs.writeFileSync(img, Buffer.alloc(0));
  fs.truncateSync(img, SIZE);
  const fd = fs.openSync(img, 'r+');
  for (const d of DATA) fs.writeSync(fd, imgBytes, d.offset, d.length, d.offset);
  fs.closeSync(fd);
  pskFile = pskAdd(path.join(dir, 'keys.psk'), 'alice');
  wrongPskFile = pskAdd(path.join(dir, 'wrong.psk'), 'alice');
  const ca = makeCa(dir, 'ca');
  certDir = serverCertDir(ca, path.join(dir, 'server-certs'), 'localhost');
  clientDir = clientCertDir(ca, path.join(dir, 'client-certs'));
  noCertDir = clientCertDir(ca, path.join(dir, 'client-nocert'), { withClientCert: false });
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

let cleanups: Array<() => Promise<unknown> | unknown> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

let nSock = 0;
async function serve(exports: Endpoint | ExportDefinition[], opts: NbdServerOptions = {}): Promise<{ server: NbdServer; uri: string; socket: string }> {
  const server = new NbdServer(exports, opts);
  const socket = path.join(dir, `s${nSock++}`);
  await server.listen({ path: socket });
  cleanups.push(() => server.close(200));
  return { server, uri: server.uri!, socket };
}

async function connect(uri: string, o: Parameters<typeof NbdClient.connect>[1] = {}): Promise<NbdClient> {
  const c = await NbdClient.connect(uri, o);
  cleanups.push(() => c.close().catch(() => undefined));
  return c;
}

/** A raw connection (no client-side checks): requests as sent, errors as the server answers them. */
async function rawConnection(uri: string, structuredReplies = true): Promise<NbdConnection> {
  const c = await NbdConnection.open(parseNbdUri(uri), {
    endpoint: uri,
    structuredReplies,
    metaContexts: ['base:allocation'],
    maxRequests: 64,
    maxBytesInFlight: 64 * MiB,
  });
  cleanups.push(() => c.close().catch(() => undefined));
  return c;
}

interface Result {
  status: number | null;
  stdout: Buffer;
  stderr: string;
}
function exec(cmd: string, args: string[], o: { timeoutMs?: number } = {}): Promise<Result> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    p.stdout.on('data', (d: Buffer) => out.push(d));
    p.stderr.on('data', (d: Buffer) => (err += d));
    const timer = setTimeout(() => {
      p.kill('SIGKILL');
      reject(new Error(`${cmd} ${args.join(' ')} timed out: ${err}`));
    }, o.timeoutMs ?? 30_000);
    p.on('error', reject);
    p.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout: Buffer.concat(out), stderr: err });
    });
  });
}
async function ok(cmd: string, args: string[]): Promise<string> {
  const r = await exec(cmd, args);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r.stdout.toString();
}
const sh = (script: string) => ok('sh', ['-c', script]);

/** sha256 of an export as nbdcopy reads it. */
async function nbdcopyHash(uri: string): Promise<string> {
  return (await sh(`nbdcopy '${uri}' - | sha256sum`)).split(' ')[0];
}

async function rejection(p: Promise<unknown>): Promise<NbdStreamError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(NbdStreamError);
    return e as NbdStreamError;
  }
  throw new Error('expected a rejection');
}

function memoryWithData(): MemoryEndpoint {
  // 1 MiB: data at [0, 64K) and [512K, 512K+4K), the rest zero ranges
  const buf = Buffer.alloc(MiB);
  randomBytes(65536).copy(buf, 0);
  randomBytes(4096).copy(buf, 512 * 1024);
  return new MemoryEndpoint(buf, 'memory:', [
    { offset: 65536, length: 512 * 1024 - 65536 },
    { offset: 512 * 1024 + 4096, length: MiB - 512 * 1024 - 4096 },
  ]);
}

// ==================================================================== nbdinfo

describe('nbdinfo', () => {
  it('sees the size, flags and block sizes, and --map equals the file holes (as nbdkit file reports them)', async () => {
    const ep = await openServedEndpoint(img);
    cleanups.push(() => ep.close());
    const { uri } = await serve(ep);
    const info = JSON.parse(await ok('nbdinfo', ['--json', uri]));
    const e = info.exports[0];
    expect(info.protocol).toBe('newstyle-fixed');
    expect(e['export-size']).toBe(SIZE);
    expect(e).toMatchObject({ is_read_only: false, can_flush: true, can_fua: true, can_trim: true, can_zero: true, can_fast_zero: true, can_multi_conn: true });
    expect(e).toMatchObject({ block_size_minimum: 1, block_size_preferred: 4096, block_size_maximum: 32 * MiB });
    expect(e.contexts).toEqual(['base:allocation']);

    const ours = await ok('nbdinfo', ['--map', uri]);
    const nbdkit = await ok('nbdkit', ['-U', '-', '-r', 'file', img, '--run', 'nbdinfo --map "$uri"']);
    expect(ours).toBe(nbdkit);
    const data = ours
      .trim()
      .split('\n')
      .map((l) => l.trim().split(/\s+/))
      .filter((f) => f[2] === '0')
      .map((f) => ({ offset: Number(f[0]), length: Number(f[1]) }));
    expect(data).toEqual(DATA);
  });

  it('lists named exports with descriptions; an unknown export is refused', async () => {
    const a = new SparseMemoryEndpoint(MiB);
    const b = new SparseMemoryEndpoint(2 * MiB);
    const { socket } = await serve([
      { name: 'a', endpoint: a, description: 'first disk' },
      { name: 'b', endpoint: b, readOnly: true },
    ]);
    const list = JSON.parse(await ok('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${socket}`]));
    expect(list.exports.map((e: Record<string, unknown>) => [e['export-name'], e.description, e['export-size'], e.is_read_only])).toEqual([
      ['a', 'first disk', MiB, false],
      ['b', undefined, 2 * MiB, true],
    ]);
    // '' is the first export
    expect(JSON.parse(await ok('nbdinfo', ['--json', `nbd+unix:///?socket=${socket}`])).exports[0]['export-size']).toBe(MiB);
    const r = await exec('nbdinfo', [`nbd+unix:///c?socket=${socket}`]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/No such file or directory for export: c/);
  });
});

// ==================================================================== qemu

describe('qemu-img and qemu-io', () => {
  it('qemu-img convert: from the server to a raw file, and from a file to the server', async () => {
    const ep = await openServedEndpoint(img, { readOnly: true });
    cleanups.push(() => ep.close());
    const { uri } = await serve(ep);
    const out = path.join(dir, 'qemu-out.raw');
    await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
    expect(sha256(fs.readFileSync(out))).toBe(sha256(imgBytes));

    const mem = new SparseMemoryEndpoint(SIZE);
    const target = await serve(mem);
    await ok('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', img, target.uri]);
    expect(sha256((await mem.read(0, SIZE)).data)).toBe(sha256(imgBytes));
    // only data was written: holes stayed unallocated
    expect(mem.allocated).toBeLessThanOrEqual(2 * MiB);
  });

  it('qemu-io writes and reads a pattern', async () => {
    const mem = new MemoryEndpoint(Buffer.alloc(MiB), 'memory:', [{ offset: 0, length: MiB }]);
    const { socket } = await serve(mem);
    const out = await ok('qemu-io', ['-f', 'raw', `nbd+unix:///?socket=${socket}`, '-c', 'write -P 0x55 0 64k', '-c', 'read -P 0x55 0 64k', '-c', 'read -P 0 64k 64k']);
    expect(out).toMatch(/wrote 65536\/65536 bytes at offset 0/);
    expect(out).toMatch(/read 65536\/65536 bytes at offset 65536/);
    expect(mem.buffer.subarray(0, 65536).equals(Buffer.alloc(65536, 0x55))).toBe(true);
    expect(mem.buffer.subarray(65536).equals(Buffer.alloc(MiB - 65536))).toBe(true);
  });
});

// ==================================================================== nbdcopy

describe('nbdcopy', () => {
  it('copies from the server and to it; its hash of the export equals the file', async () => {
    const ep = await openServedEndpoint(img, { readOnly: true });
    cleanups.push(() => ep.close());
    const src = await serve(ep);
    expect(await nbdcopyHash(src.uri)).toBe(sha256(imgBytes));
    const out = path.join(dir, 'nbdcopy-out.img');
    await ok('nbdcopy', [src.uri, out]);
    expect(fs.readFileSync(out).equals(imgBytes)).toBe(true);

    // to a writable file export, in place (the file is not truncated)
    const dst = path.join(dir, 'nbdcopy-dst.img');
    fs.writeFileSync(dst, Buffer.alloc(SIZE, 0xee));
    const dep = await openServedEndpoint(dst);
    cleanups.push(() => dep.close());
    const target = await serve(dep);
    await ok('nbdcopy', ['--flush', img, target.uri]);
    expect(sha256(fs.readFileSync(dst))).toBe(sha256(imgBytes));
    expect(await nbdcopyHash(target.uri)).toBe(sha256(imgBytes));
  });
});

// ==================================================================== NbdClient

describe('NbdClient', () => {
  it('reads with OFFSET_HOLE chunks for zero ranges, and block status follows the extents', async () => {
    const mem = memoryWithData();
    const { uri } = await serve(mem);
    const c = await connect(uri);
    expect(c.structuredReplies).toBe(true);
    expect(c.canMetaContext('base:allocation')).toBe(true);
    const r = await c.pread(0, MiB);
    expect(r.data.equals(mem.buffer)).toBe(true);
    expect(r.holes).toEqual([
      { offset: 65536, length: 512 * 1024 - 65536 },
      { offset: 512 * 1024 + 4096, length: MiB - 512 * 1024 - 4096 },
    ]);
    expect((await c.pread(60 * 1024, 8192)).holes).toEqual([{ offset: 65536, length: 4096 }]);
    const Z = P.NBD_STATE_HOLE | P.NBD_STATE_ZERO;
    expect(await c.blockStatus(0, MiB)).toEqual([
      { offset: 0, length: 65536, flags: 0 },
      { offset: 65536, length: 512 * 1024 - 65536, flags: Z },
      { offset: 512 * 1024, length: 4096, flags: 0 },
      { offset: 512 * 1024 + 4096, length: MiB - 512 * 1024 - 4096, flags: Z },
    ]);
    // clipped to the request
    expect(await c.blockStatus(100_000, 10)).toEqual([{ offset: 100_000, length: 10, flags: Z }]);

    // REQ_ONE: exactly one extent, not longer than the request
    const raw = await rawConnection(uri);
    const one = await raw.request(P.NBD_CMD_BLOCK_STATUS, P.NBD_CMD_FLAG_REQ_ONE, 0, MiB, undefined, undefined, raw.info.metaContexts.get('base:allocation'));
    expect(one.extents).toEqual([{ length: 65536, flags: 0 }]);
  });

  it('zero (NO_HOLE, FAST_ZERO), trim, flush, FUA and multi-conn', async () => {
    const mem = memoryWithData();
    const { uri } = await serve(mem);
    const c = await connect(uri, { connections: 4 });
    expect(await c.joined()).toBe(4);
    expect([c.canZero, c.canFastZero, c.canTrim, c.canFlush, c.canFua, c.canMultiConn]).toEqual([true, true, true, true, true, true]);
    await Promise.all([c.pwrite(0, Buffer.alloc(4096, 1)), c.pwrite(4096, Buffer.alloc(4096, 2)), c.pwrite(8192, Buffer.alloc(4096, 3), { fua: true })]);
    expect(mem.buffer.subarray(0, 12288).equals(Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 2), Buffer.alloc(4096, 3)]))).toBe(true);
    expect(mem.log).toContain('flush'); // FUA
    mem.log.length = 0;
    await c.zero(0, 4096);
    await c.zero(4096, 4096, { noHole: true });
    await c.trim(8192, 4096);
    await c.flush();
    expect(mem.log).toEqual(['zero 0+4096', 'zero 4096+4096 allocate', 'zero 8192+4096', 'flush']);
    expect(mem.buffer.subarray(0, 12288).equals(Buffer.alloc(12288))).toBe(true);
    // MemoryEndpoint cannot zero fast: ENOTSUP, nothing done
    const e = await rejection(c.zero(0, 4096, { fastZero: true }));
    expect(e).toMatchObject({ code: 'ERR_SERVER', nbdError: 'ENOTSUP', command: 'NBD_CMD_WRITE_ZEROES' });
    // a sparse memory endpoint can
    const fast = await serve(new SparseMemoryEndpoint(MiB));
    const c2 = await connect(fast.uri);
    await c2.zero(0, MiB, { fastZero: true });
  });

  it('answers with simple replies when structured replies are not negotiated', async () => {
    const mem = memoryWithData();
    const { uri } = await serve(mem);
    const c = await connect(uri, { structuredReplies: false });
    expect(c.structuredReplies).toBe(false);
    expect(c.canMetaContext('base:allocation')).toBe(false);
    const r = await c.pread(0, MiB);
    expect(r.data.equals(mem.buffer)).toBe(true);
    expect(r.holes).toEqual([]);
    await c.pwrite(100, Buffer.from('hello'));
    expect(mem.buffer.toString('utf8', 100, 105)).toBe('hello');
  });

  it('processes requests concurrently and replies out of order', async () => {
    const mem = memoryWithData();
    const { uri, server } = await serve(mem);
    server.faults = { delayMs: (type, offset) => (type === P.NBD_CMD_READ && offset === 0 ? 300 : 0) };
    const c = await rawConnection(uri);
    const order: number[] = [];
    const t0 = Date.now();
    await Promise.all([
      c.request(P.NBD_CMD_READ, 0, 0, 4096, undefined, Buffer.alloc(4096)).then(() => order.push(0)),
      c.request(P.NBD_CMD_READ, 0, 4096, 4096, undefined, Buffer.alloc(4096)).then(() => order.push(1)),
      c.request(P.NBD_CMD_FLUSH, 0, 0, 0).then(() => order.push(2)),
    ]);
    // the slow first read is answered last; the others as they finish
    expect(order[2]).toBe(0);
    expect(order.slice(0, 2).sort()).toEqual([1, 2]);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
  });

  it('answers bad requests with NBD errors: EPERM read-only, EINVAL/ENOSPC out of range, EINVAL bad flags and commands', async () => {
    const mem = memoryWithData();
    const ro = await serve([{ name: '', endpoint: mem, readOnly: true }]);
    for (const structured of [true, false]) {
      const c = await rawConnection(ro.uri, structured);
      expect(c.info.flags & P.NBD_FLAG_READ_ONLY).toBeTruthy();
      const err = async (type: number, flags: number, offset: number, length: number, payload?: Buffer) =>
        (await rejection(c.request(type, flags, offset, length, payload, type === P.NBD_CMD_READ ? Buffer.alloc(length) : undefined, 1))).nbdError;
      expect(await err(P.NBD_CMD_WRITE, 0, 0, 4, Buffer.alloc(4))).toBe('EPERM');
      expect(await err(P.NBD_CMD_WRITE_ZEROES, 0, 0, 4096)).toBe('EPERM');
      expect(await err(P.NBD_CMD_TRIM, 0, 0, 4096)).toBe('EPERM');
      expect(await err(P.NBD_CMD_READ, 0, MiB - 1, 2)).toBe('EINVAL');
      expect(await err(P.NBD_CMD_READ, P.NBD_CMD_FLAG_FUA, 0, 2)).toBe('EINVAL');
      expect(await err(P.NBD_CMD_READ, 0, 0, 0)).toBe('EINVAL');
      expect(await err(P.NBD_CMD_CACHE, 0, 0, 4096)).toBe('EINVAL');
      expect(await err(42, 0, 0, 4096)).toBe('EINVAL');
      if (structured) expect(await err(P.NBD_CMD_BLOCK_STATUS, 0, MiB, 1)).toBe('EINVAL');
      // the connection is still fine
      const r = await c.request(P.NBD_CMD_READ, 0, 0, 4096, undefined, Buffer.alloc(4096));
      expect(r.dest!.equals(mem.buffer.subarray(0, 4096))).toBe(true);
    }
    expect(mem.log.filter((l) => !l.startsWith('read') && !l.startsWith('extents'))).toEqual([]);
    const rw = await serve(new SparseMemoryEndpoint(MiB));
    const c = await rawConnection(rw.uri);
    const e = await rejection(c.request(P.NBD_CMD_WRITE, 0, MiB - 2, 4, Buffer.alloc(4)));
    expect(e).toMatchObject({ code: 'ERR_SERVER', nbdError: 'ENOSPC' });
    expect(e.message).toMatch(/beyond the end of the export/);
    // block status without a negotiated context
    const plain = await NbdConnection.open(parseNbdUri(rw.uri), { endpoint: rw.uri, structuredReplies: true, metaContexts: [], maxRequests: 8, maxBytesInFlight: MiB });
    cleanups.push(() => plain.close());
    expect((await rejection(plain.request(P.NBD_CMD_BLOCK_STATUS, 0, 0, 4096, undefined, undefined, 1))).nbdError).toBe('EINVAL');
  });

  it('turns endpoint failures into NBD errors carrying their message', async () => {
    class Failing extends MemoryEndpoint {
      override async write(offset: number): Promise<void> {
        throw new NbdStreamError('ERR_IO', 'write failed: ENOSPC no space left on device', { offset, cause: Object.assign(new Error('x'), { code: 'ENOSPC' }) });
      }
      override async read(): Promise<never> {
        throw new Error('disk on fire');
      }
      override async extents(): Promise<never> {
        throw new Error('no map today');
      }
    }
    const { uri } = await serve(new Failing(Buffer.alloc(MiB)));
    const c = await connect(uri);
    expect(await rejection(c.pwrite(0, Buffer.alloc(8)))).toMatchObject({ code: 'ERR_SERVER', nbdError: 'ENOSPC', message: expect.stringMatching(/ENOSPC no space left on device$/) });
    // extents failing does not fail reads (read as data), but the read itself does
    expect(await rejection(c.pread(0, 8))).toMatchObject({ code: 'ERR_SERVER', nbdError: 'EIO', message: expect.stringMatching(/disk on fire$/) });
    expect(await rejection(c.blockStatus(0, 8))).toMatchObject({ code: 'ERR_SERVER', nbdError: 'EIO', message: expect.stringMatching(/no map today$/) });
  });
});

// ==================================================================== TLS

describe('TLS', () => {
  it('PSK: nbdinfo and nbdcopy (both ways) and NbdClient over nbds+unix; plaintext and a wrong key are refused', async () => {
    const mem = new SparseMemoryEndpoint(SIZE);
    const { socket } = await serve(mem, { tls: { mode: 'require', pskFile } });
    const tlsUri = `nbds+unix://alice@/?socket=${socket}&tls-psk-file=${pskFile}`;
    expect(await ok('nbdinfo', [tlsUri])).toMatch(/newstyle-fixed with TLS, using structured packets/);
    await ok('nbdcopy', [img, tlsUri]);
    expect(await nbdcopyHash(tlsUri)).toBe(sha256(imgBytes));
    const c = await connect(tlsUri);
    expect(c.tls).toBe(true);
    expect((await c.pread(10 * MiB, 4096)).data.equals(imgBytes.subarray(10 * MiB, 10 * MiB + 4096))).toBe(true);

    const plain = await exec('nbdinfo', [`nbd+unix:///?socket=${socket}`]);
    expect(plain.status).not.toBe(0);
    expect((await rejection(NbdClient.connect(`nbd+unix:///?socket=${socket}`))).code).toBe('ERR_TLS');
    const wrong = await exec('nbdinfo', [`nbds+unix://alice@/?socket=${socket}&tls-psk-file=${wrongPskFile}`]);
    expect(wrong.status).not.toBe(0);
    expect((await rejection(NbdClient.connect(`nbds+unix://alice@/?socket=${socket}&tls-psk-file=${wrongPskFile}`))).code).toBe('ERR_TLS');
  });

  it('X.509: nbdinfo and nbdcopy with tls-certificates; --tls-verify-peer refuses a client without a certificate', async () => {
    const ep = await openServedEndpoint(img, { readOnly: true });
    cleanups.push(() => ep.close());
    const { socket } = await serve(ep, { tls: { mode: 'require', certificates: certDir } });
    const uri = `nbds+unix:///?socket=${socket}&tls-certificates=${noCertDir}`;
    expect(await ok('nbdinfo', [uri])).toMatch(/with TLS/);
    expect(await nbdcopyHash(uri)).toBe(sha256(imgBytes));
    expect((await connect(uri)).tls).toBe(true);

    const strict = await serve(ep, { tls: { mode: 'require', certificates: certDir, verifyPeer: true } });
    const good = `nbds+unix:///?socket=${strict.socket}&tls-certificates=${clientDir}`;
    expect(await nbdcopyHash(good)).toBe(sha256(imgBytes));
    const r = await exec('nbdinfo', [`nbds+unix:///?socket=${strict.socket}&tls-certificates=${noCertDir}`]);
    expect(r.status).not.toBe(0);
    expect((await rejection(NbdClient.connect(`nbds+unix:///?socket=${strict.socket}&tls-certificates=${noCertDir}`))).code).toBe('ERR_TLS');
  });

  it('mode "on" serves plaintext and TLS clients alike', async () => {
    const { socket } = await serve(new SparseMemoryEndpoint(MiB), { tls: { mode: 'on', pskFile } });
    expect(await ok('nbdinfo', [`nbd+unix:///?socket=${socket}`])).toMatch(/without TLS/);
    expect(await ok('nbdinfo', [`nbds+unix://alice@/?socket=${socket}&tls-psk-file=${pskFile}`])).toMatch(/with TLS/);
  });
});

// ==================================================================== faults

describe('fault injection', () => {
  it('injected errors reach NbdClient as ERR_SERVER with the NBD error, only where injected', async () => {
    const mem = memoryWithData();
    const { uri, server } = await serve(mem);
    const at = (offset: number, errno: number) => (o: number) => (o === offset ? errno : undefined);
    server.faults = { readError: at(4096, 5), writeError: at(8192, 28), zeroError: at(0, 1), blockStatusError: at(65536, 5) };
    const c = await connect(uri);
    expect(await rejection(c.pread(4096, 4096))).toMatchObject({ code: 'ERR_SERVER', nbdError: 'EIO', offset: 4096, command: 'NBD_CMD_READ' });
    expect((await c.pread(0, 4096)).data.equals(mem.buffer.subarray(0, 4096))).toBe(true);
    expect(await rejection(c.pwrite(8192, Buffer.alloc(10)))).toMatchObject({ code: 'ERR_SERVER', nbdError: 'ENOSPC' });
    await c.pwrite(8193, Buffer.alloc(10));
    expect(await rejection(c.zero(0, 4096))).toMatchObject({ code: 'ERR_SERVER', nbdError: 'EPERM', command: 'NBD_CMD_WRITE_ZEROES' });
    expect(await rejection(c.blockStatus(65536, 4096))).toMatchObject({ code: 'ERR_SERVER', nbdError: 'EIO', command: 'NBD_CMD_BLOCK_STATUS' });
    expect((await rejection(c.pread(4096, 1))).message).toMatch(/injected error at offset 4096/);
    // still usable
    expect((await c.blockStatus(0, 4096)).length).toBe(1);
  });

  it('delayMs delays every request', async () => {
    const { uri, server } = await serve(memoryWithData());
    const c = await connect(uri);
    server.faults = { delayMs: 150 };
    const t0 = Date.now();
    await Promise.all([c.pread(0, 4096), c.pread(4096, 4096)]);
    const dt = Date.now() - t0;
    expect(dt).toBeGreaterThanOrEqual(140);
    expect(dt).toBeLessThan(1500); // concurrently, not one after the other
  });

  it('closeAfterBytes cuts the connection mid-reply: the client fails, never returns short data', async () => {
    const { uri, server } = await serve(memoryWithData());
    server.faults = { closeAfterBytes: 100_000 };
    const c = await connect(uri);
    const first = await c.pread(0, 65536); // 65536 + 28 bytes: within the budget
    expect(first.data.length).toBe(65536);
    const e = await rejection(c.pread(0, 65536));
    expect(['ERR_CLOSED', 'ERR_PROTOCOL', 'ERR_CONNECT']).toContain(e.code);
  });

  // [violation, request, message, message with extended headers when it differs]
  const violations: Array<[Violation, 'read' | 'status', string, string?]> = [
    ['wrong-cookie', 'read', 'reply for unknown cookie 0x8000000000000002'],
    ['bad-magic', 'read', 'bad reply magic 0xdeadbeef', 'reply magic 0xdeadbeef received after extended headers were negotiated'],
    ['oversized-payload', 'read', 'structured reply chunk of 2147483632 bytes is too large'],
    ['chunk-past-request', 'read', 'OFFSET_DATA chunk 1+8192 outside the request 0+8192'],
    ['simple-after-structured', 'read', 'simple reply to NBD_CMD_READ after structured replies were negotiated', 'simple reply received after extended headers were negotiated'],
    ['zero-length-extent', 'status', 'block status extent 0 at offset 0 has zero length'],
    ['overlong-extent', 'status', 'block status extent 0 at offset 0 goes past the requested range'],
    ['unasked-context', 'status', 'block status for context id 2, which was not asked for'],
    ['wrong-cookie', 'status', 'reply for unknown cookie 0x8000000000000002'],
  ];
  it.each(violations)('violation %s (%s): NbdClient fails with ERR_PROTOCOL, after violateAfter correct replies, with extended headers and without', async (violation, op, message, extendedMessage) => {
    const { uri, server } = await serve(memoryWithData());
    server.faults = { violation, violateAfter: 1 };
    for (const extendedHeaders of [true, false]) {
      const c = await connect(uri, { extendedHeaders });
      expect(c.extendedHeaders).toBe(extendedHeaders);
      const call = () => (op === 'read' ? c.pread(0, 8192) : c.blockStatus(0, 8192));
      await call(); // the first one is answered correctly
      const e = await rejection(call());
      expect(e.code).toBe('ERR_PROTOCOL');
      expect(e.message).toBe(extendedHeaders ? (extendedMessage ?? message) : message);
      expect(e.endpoint).toBe(uri);
      // the connection is gone for good
      expect((await rejection(c.pread(0, 1))).code).toBe('ERR_PROTOCOL');
    }
  });

  it('violation truncated-header: part of a header, then the server hangs up', async () => {
    const { uri, server } = await serve(memoryWithData());
    server.faults = { violation: 'truncated-header' };
    const c = await connect(uri);
    const e = await rejection(c.pread(0, 4096));
    // EOF inside a reply header; see the report: NbdClient calls this ERR_CLOSED, not ERR_PROTOCOL
    expect(['ERR_PROTOCOL', 'ERR_CLOSED']).toContain(e.code);
    expect(e.message).toMatch(/closed|truncated|EOF|middle/i);
  });
});

// ==================================================================== misbehaving clients

/** Connect, send `bytes`, collect what the server says until it closes (or `ms`). */
function talk(socket: string, bytes: Buffer[], ms = 2000): Promise<{ data: Buffer; closed: boolean }> {
  return new Promise((resolve) => {
    const s = net.connect(socket);
    const got: Buffer[] = [];
    let closed = false;
    const timer = setTimeout(() => {
      s.destroy();
      resolve({ data: Buffer.concat(got), closed });
    }, ms);
    s.on('data', (d) => got.push(d));
    s.on('error', () => undefined);
    s.on('close', () => {
      closed = true;
      clearTimeout(timer);
      resolve({ data: Buffer.concat(got), closed });
    });
    s.on('connect', () => {
      for (const b of bytes) s.write(b);
    });
  });
}

/** Option replies after the 18-byte greeting: [option, type, data]. */
function optionReplies(data: Buffer): Array<[number, number, string]> {
  const out: Array<[number, number, string]> = [];
  for (let p = 18; p + 20 <= data.length; ) {
    const len = data.readUInt32BE(p + 16);
    out.push([data.readUInt32BE(p + 8), data.readUInt32BE(p + 12), data.toString('utf8', p + 20, p + 20 + len)]);
    p += 20 + len;
  }
  return out;
}

describe('misbehaving clients', () => {
  it('unknown options get NBD_REP_ERR_UNSUP, options with data they do not take NBD_REP_ERR_INVALID, TLS options without TLS are refused, ABORT is acknowledged', async () => {
    const { socket } = await serve(new SparseMemoryEndpoint(MiB));
    const r = await talk(socket, [
      encodeClientFlags(3),
      encodeOption(99),
      encodeOption(P.NBD_OPT_EXTENDED_HEADERS, Buffer.from('x')), // takes no data
      encodeOption(P.NBD_OPT_STARTTLS),
      encodeOption(P.NBD_OPT_LIST, Buffer.from('x')),
      encodeOption(P.NBD_OPT_SET_META_CONTEXT, Buffer.alloc(8)), // before STRUCTURED_REPLY
      encodeOption(P.NBD_OPT_STRUCTURED_REPLY),
      encodeGo('nope', []),
      encodeOption(P.NBD_OPT_ABORT),
    ]);
    expect(r.closed).toBe(true);
    expect(r.data.subarray(0, 18).toString('hex')).toBe('4e42444d4147494349484156454f50540003');
    expect(optionReplies(r.data).map(([o, t]) => [o, P.optionReplyName(t)])).toEqual([
      [99, 'NBD_REP_ERR_UNSUP'],
      [P.NBD_OPT_EXTENDED_HEADERS, 'NBD_REP_ERR_INVALID'],
      [P.NBD_OPT_STARTTLS, 'NBD_REP_ERR_POLICY'],
      [P.NBD_OPT_LIST, 'NBD_REP_ERR_INVALID'],
      [P.NBD_OPT_SET_META_CONTEXT, 'NBD_REP_ERR_INVALID'],
      [P.NBD_OPT_STRUCTURED_REPLY, 'NBD_REP_1'],
      [P.NBD_OPT_GO, 'NBD_REP_ERR_UNKNOWN'],
      [P.NBD_OPT_ABORT, 'NBD_REP_1'],
    ]);
  });

  it('--tls=require refuses everything but STARTTLS and ABORT, and hangs up on EXPORT_NAME', async () => {
    const { socket } = await serve(new SparseMemoryEndpoint(MiB), { tls: { mode: 'require', pskFile } });
    const r = await talk(socket, [encodeClientFlags(3), encodeOption(P.NBD_OPT_LIST), encodeOption(P.NBD_OPT_STRUCTURED_REPLY), encodeGo('', []), encodeOption(P.NBD_OPT_ABORT)]);
    expect(optionReplies(r.data).map(([o, t]) => [o, P.optionReplyName(t)])).toEqual([
      [P.NBD_OPT_LIST, 'NBD_REP_ERR_TLS_REQD'],
      [P.NBD_OPT_STRUCTURED_REPLY, 'NBD_REP_ERR_TLS_REQD'],
      [P.NBD_OPT_GO, 'NBD_REP_ERR_TLS_REQD'],
      [P.NBD_OPT_ABORT, 'NBD_REP_1'],
    ]);
    const e = await talk(socket, [encodeClientFlags(3), encodeOption(P.NBD_OPT_EXPORT_NAME)]);
    expect(e.closed).toBe(true);
    expect(e.data.length).toBe(18); // greeting only: no export data in plain text
  });

  it('hangs up on plain text sent after STARTTLS before its reply (no command injection into TLS)', async () => {
    const { socket, server } = await serve(new SparseMemoryEndpoint(MiB), { tls: { mode: 'require', pskFile } });
    const errors: string[] = [];
    server.on('clientError', (e: NbdStreamError) => errors.push(e.message));
    const r = await talk(socket, [Buffer.concat([encodeClientFlags(3), encodeOption(P.NBD_OPT_STARTTLS), encodeOption(P.NBD_OPT_STRUCTURED_REPLY)])]);
    expect(r.closed).toBe(true);
    expect(optionReplies(r.data).map(([o, t]) => [o, P.optionReplyName(t)])).toEqual([[P.NBD_OPT_STARTTLS, 'NBD_REP_1']]);
    expect(errors).toEqual(['client sent data before the reply to NBD_OPT_STARTTLS']);
  });

  it('survives garbage, bad magic, unknown client flags and clients vanishing mid-request', async () => {
    const mem = memoryWithData();
    const { socket, uri, server } = await serve(mem);
    const errors: string[] = [];
    server.on('clientError', (e: NbdStreamError) => errors.push(`${e.code}: ${e.message}`));
    expect((await talk(socket, [randomBytes(1000)])).closed).toBe(true);
    expect((await talk(socket, [encodeClientFlags(0x80)])).closed).toBe(true);
    const badReq = encodeRequest(0, P.NBD_CMD_READ, 1, 0, 1);
    badReq.writeUInt32BE(0x12345678, 0);
    expect((await talk(socket, [encodeClientFlags(3), encodeGo('', []), badReq])).closed).toBe(true);
    // EXPORT_NAME (no NO_ZEROES: 124 zero bytes follow size and flags), then gone with requests in flight
    // (the reply is held back well past the client's stay, however loaded the machine)
    server.faults = { delayMs: 1500 };
    const gone = await talk(socket, [encodeClientFlags(1), encodeOption(P.NBD_OPT_EXPORT_NAME), encodeRequest(0, P.NBD_CMD_READ, 1, 0, MiB)], 500);
    expect(gone.data.length).toBe(18 + 134);
    server.faults = {};
    expect(errors).toEqual(expect.arrayContaining([expect.stringMatching(/ERR_PROTOCOL: unknown client flags 0x80/), expect.stringMatching(/ERR_PROTOCOL: bad request magic 0x12345678/)]));
    // and still serves
    const c = await connect(uri);
    expect((await c.pread(0, MiB)).data.equals(mem.buffer)).toBe(true);
    await new Promise((r) => setTimeout(r, 150));
  });
});

// ==================================================================== CLI

describe('nbdstream serve', () => {
  it('works as a socket-activated [ nbdstream serve … ] endpoint, source and destination', async () => {
    const out = path.join(dir, 'activated-out.img');
    let r = await runCli(['--', '[', CLI, 'serve', img, ']', out]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(sha256(fs.readFileSync(out))).toBe(sha256(imgBytes));
    // into a served file: written in place
    const dst = path.join(dir, 'activated-dst.img');
    fs.writeFileSync(dst, Buffer.alloc(SIZE, 0x11));
    r = await runCli(['--', img, '[', CLI, 'serve', dst, ']']);
    expect(r.status).toBe(0);
    expect(sha256(fs.readFileSync(dst))).toBe(sha256(imgBytes));
  });

  it('--run: $uri reaches the export, and the exit status is the command’s', async () => {
    const r = await runCli(['serve', '--size', '1M', '--export', 'mem', '--run', 'nbdinfo --json "$uri" && qemu-io -f raw "$uri" -c "write -P 7 0 4k" >/dev/null && echo "$uri" >&2 && exit 7', 'memory:']);
    expect(r.status).toBe(7);
    const info = JSON.parse(r.stdout.toString());
    expect(info.exports[0]).toMatchObject({ 'export-name': 'mem', 'export-size': MiB });
    expect(r.stderr).toMatch(/^nbd\+unix:\/\/\/mem\?socket=\S+\/sock\n$/);
  });

  it('--read-only exports refuse writes (EPERM); TLS PSK from the CLI refuses plaintext', async () => {
    let r = await runCli(['serve', '--read-only', '--run', 'nbdinfo --json "$uri"; qemu-io -f raw "$uri" -c "write 0 4k"', img]);
    const info = JSON.parse(r.stdout.toString().slice(0, r.stdout.toString().lastIndexOf('}') + 1));
    expect(info.exports[0].is_read_only).toBe(true);
    expect(r.status).not.toBe(0);
    r = await runCli([
      'serve',
      '--tls=require',
      `--tls-psk=${pskFile}`,
      '--size=4M',
      '--run',
      `nbdinfo "nbd+unix:///?socket=$unixsocket" >/dev/null 2>&1 && exit 9; nbdcopy "${img}" "nbds+unix://alice@/?socket=$unixsocket&tls-psk-file=${pskFile}" 2>/dev/null && exit 8; nbdinfo --size "nbds+unix://alice@/?socket=$unixsocket&tls-psk-file=${pskFile}"`,
      'memory:',
    ]);
    // nbdcopy refuses a 64M source into a 4M destination; the TLS connection itself works
    expect(r.status).toBe(0);
    expect(r.stdout.toString().trim()).toBe(String(4 * MiB));
  });

  it('serves TCP and stops on SIGTERM; errors are one line with status 1', async () => {
    const child = spawn(CLI, ['serve', '--port', '0', '--bind', '127.0.0.1', '-v', img], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    const until = Date.now() + 10_000;
    while (!/nbd:\/\/127\.0\.0\.1:\d+\//.test(err) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    const uri = /nbd:\/\/127\.0\.0\.1:\d+\//.exec(err)![0];
    expect(await nbdcopyHash(uri)).toBe(sha256(imgBytes));
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    child.kill('SIGTERM');
    expect(await exited).toBe(0);

    for (const [args, re] of [
      [['serve', path.join(dir, 'missing.img')], /^nbdstream serve: .*missing\.img: cannot open: ENOENT/],
      [['serve', 'memory:'], /^nbdstream serve: memory:: memory: needs the --size option/],
      [['serve', '--size', '1M', img], /^nbdstream serve: .*: --size only applies to memory:$/m],
      [['serve', '--frob', img], /^nbdstream serve: unknown option: --frob/],
      [['serve', '--tls=require', img], /^nbdstream serve: --tls=require needs --tls-psk=FILE or --tls-certificates=DIR/],
    ] as Array<[string[], RegExp]>) {
      const r = await runCli(args);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(re);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
  });
});
