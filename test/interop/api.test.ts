/**
 * The public API (lib/index.ts and its bundle): cancellation by AbortSignal against real nbdkit
 * servers slowed by the delay filter (their logs show which requests went out and the
 * disconnects), the server's signal, unknown options, errors with Node's fields and library
 * option names, and a copy into a memfs volume (the README's example).
 */
import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { getSystemErrorName } from 'node:util';
import { Volume } from 'memfs';
import { dirPerFile, serversPerTest } from '../helpers/fixtures.js';
import { logLines, nbdcopyHash, sha256 } from '../helpers/servers.js';
import { ROOT, run } from '../helpers/cli.js';
import * as api from '../../lib/index.js';
import { MemoryEndpoint, NbdServer, NbdStreamError, connect, copy, copyProgress, serve } from '../../lib/index.js';

const MiB = 2 ** 20;
const { kit } = serversPerTest();
const dir = dirPerFile('nbdstream-api-');

/** The rejection of `p` (fails the test if it resolves). */
async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  throw new Error('expected a rejection');
}

function expectAbortError(err: unknown, reason: unknown): void {
  expect(err).toBeInstanceOf(NbdStreamError);
  const e = err as NbdStreamError;
  expect([e.name, e.code, e.message]).toEqual(['AbortError', 'ABORT_ERR', 'The operation was aborted']);
  expect(e.cause).toBe(reason);
}

/** Wait (at most 5 s) until nbdkit's log shows the client's disconnect. */
async function disconnected(logFile: string): Promise<void> {
  for (let i = 0; i < 250 && !fs.readFileSync(logFile, 'utf8').includes(' Disconnect '); i++) await new Promise((r) => setTimeout(r, 20));
  expect(fs.readFileSync(logFile, 'utf8')).toMatch(/ Disconnect transactions=\d+/);
}

const reads = (logFile: string) => logLines(logFile, ['Read']).filter((l) => !l.includes('...Read')).length;

// 256 MiB of data in 1024 NBD reads of 256 KiB, 100 ms each, two in flight (-R 2): 51 s for the
// whole copy. The first progress comes after the first 4 MiB read (16 NBD reads: copy() reads
// consecutive data pieces together, up to 4 MiB).
const slowSource = () => kit('pattern', ['256M', 'delay-read=100ms'], { log: true, filters: ['delay'], readOnly: true });
const slowOptions = { connections: 1, requests: 2, requestSize: 256 * 1024 };

describe('cancelling a copy', () => {
  it('abort mid-copy: no request after it, both endpoints closed (disconnects logged), AbortError with the reason', async () => {
    const src = await slowSource();
    const dst = await kit('memory', ['256M'], { log: true });
    const ac = new AbortController();
    const reason = new Error('enough');
    let abortedAt = 0;
    const copying = copy(src.uri, dst.uri, {
      ...slowOptions,
      signal: ac.signal,
      onProgress: (done) => {
        if (done > 0 && !abortedAt) {
          abortedAt = Date.now();
          ac.abort(reason);
        }
      },
    });
    const err = await rejection(copying);
    const stoppedAfter = Date.now() - abortedAt;
    expectAbortError(err, reason);
    await disconnected(src.logFile!);
    await disconnected(dst.logFile!);
    const n = reads(src.logFile!);
    // the first two 4 MiB reads (32 NBD reads, interleaved) and the two in flight at the abort
    // (a few more on a slow machine, where reads complete while the first chunk is written),
    // not the 1024 of the whole copy
    expect(n).toBeGreaterThanOrEqual(16);
    expect(n).toBeLessThanOrEqual(40);
    // it stopped once the two reads in flight were answered, not after the 51 s of the copy
    expect(stoppedAfter).toBeLessThan(5000);
    await new Promise((r) => setTimeout(r, 500));
    expect(reads(src.logFile!)).toBe(n);
  });

  it('an already aborted signal rejects before anything is opened', async () => {
    const src = await kit('memory', ['1M'], { log: true });
    const reason = new Error('no');
    const err = await rejection(copy(src.uri, 'null:', { signal: AbortSignal.abort(reason) }));
    expectAbortError(err, reason);
    expect(fs.readFileSync(src.logFile!, 'utf8')).not.toMatch(/ Connect /);
  });

  it('breaking out of a copyProgress loop cancels the copy and closes its endpoints before the loop is left', async () => {
    const src = await slowSource();
    const dst = await kit('memory', ['256M'], { log: true });
    let reports = 0;
    for await (const p of copyProgress(src.uri, dst.uri, { ...slowOptions, interval: 0 })) {
      if (p.bytes_done > 0 && ++reports === 1) break;
    }
    // the loop was left after copy() closed both connections
    expect(fs.readFileSync(dst.logFile!, 'utf8')).toMatch(/ Disconnect /);
    await disconnected(src.logFile!);
    const n = reads(src.logFile!);
    expect(n).toBeLessThanOrEqual(40);
    await new Promise((r) => setTimeout(r, 500));
    expect(reads(src.logFile!)).toBe(n);
  });

  it("copyProgress's signal aborts the loop with the AbortError", async () => {
    const src = await slowSource();
    const ac = new AbortController();
    const err = await rejection(
      (async () => {
        for await (const p of copyProgress(src.uri, 'null:', { ...slowOptions, interval: 0, signal: ac.signal })) if (p.bytes_done > 0) ac.abort('stop');
      })(),
    );
    expectAbortError(err, 'stop');
    await disconnected(src.logFile!);
  });
});

describe('the server in the API', () => {
  it('exports NbdServer, serve, NbdClient, connect and streamx pipeline helpers, in the bundle too', async () => {
    const bundle = await import(path.join(ROOT, 'dist/nbdstream.lib.mjs'));
    for (const m of [api, bundle]) {
      for (const name of ['NbdServer', 'serve', 'NbdClient', 'connect', 'copy', 'copyProgress', 'pipelinePromise', 'pipeline']) expect(typeof m[name], name).toBe('function');
    }
  });

  it("NbdServer's signal closes its listener and its clients", async () => {
    const sock = path.join(dir, 'srv.sock');
    const ac = new AbortController();
    const server = new NbdServer(new MemoryEndpoint(Buffer.alloc(MiB, 7)), { signal: ac.signal });
    await server.listen({ path: sock });
    const client = await connect(server.uri!);
    expect((await client.pread(0, 4096)).data).toEqual(Buffer.alloc(4096, 7));
    expect(server.connections).toBe(1);
    ac.abort();
    await server.close(); // the close the abort started
    expect(server.connections).toBe(0);
    const err = await rejection(client.pread(0, 4096));
    expect((err as NbdStreamError).code).toMatch(/^ERR_(CLOSED|CONNECT)$/);
    await client.close().catch(() => undefined);
    const refused = await rejection(new Promise((resolve, reject) => net.connect(sock).once('connect', resolve).once('error', reject)));
    expect((refused as NodeJS.ErrnoException).code).toMatch(/^(ENOENT|ECONNREFUSED)$/);
  });

  it('serve(spec) serves a file in place; copy() reads it; the signal stops it and closes the file', async () => {
    const file = path.join(dir, 'served.img');
    const data = Buffer.alloc(2 * MiB);
    data.write('hello', MiB);
    fs.writeFileSync(file, data);
    const ac = new AbortController();
    const server = await serve(file, { path: path.join(dir, 'serve.sock'), exportName: 'disk', readOnly: true, signal: ac.signal });
    expect(server).toBeInstanceOf(NbdServer);
    expect(server.uri).toBe(`nbd+unix:///disk?socket=${path.join(dir, 'serve.sock')}`);
    const out = path.join(dir, 'served-copy.img');
    await copy(server.uri!, out);
    expect(sha256(fs.readFileSync(out))).toBe(sha256(data));
    const fds = () => fs.readdirSync('/proc/self/fd').filter((fd) => { try { return fs.readlinkSync(`/proc/self/fd/${fd}`) === file; } catch { return false; } }).length;
    expect(fds()).toBe(1);
    ac.abort();
    await server.close();
    expect(fds()).toBe(0);
    expect(fs.existsSync(path.join(dir, 'serve.sock'))).toBe(false);
  });
});

describe('options and errors', () => {
  it('unknown option names are a TypeError naming them', async () => {
    await expect(copy('a', 'b', { requestsize: 65536 } as never)).rejects.toThrow(new TypeError('copy(): unknown option "requestsize" (did you mean "requestSize"?)'));
    await expect(copy('a', 'b', { bogus: 1 } as never)).rejects.toThrow(new TypeError('copy(): unknown option "bogus"'));
    await expect(copyProgress('a', 'b', { intervall: 1 } as never).next()).rejects.toThrow(new TypeError('copyProgress(): unknown option "intervall"'));
    expect(() => new NbdServer(new MemoryEndpoint(Buffer.alloc(4096)), { readonly: true } as never)).toThrow(new TypeError('NbdServer: unknown option "readonly" (did you mean "readOnly"?)'));
    await expect(serve('memory:', { size: 4096, socket: '/tmp/x' } as never)).rejects.toThrow(new TypeError('serve(): unknown option "socket"'));
    await expect(copy({ file: '/x', fss: {} } as never, 'null:')).rejects.toThrow(new TypeError('a { file } endpoint: unknown option "fss"'));
    await expect(copy(undefined as never, 'null:')).rejects.toThrow(new TypeError('an endpoint is a URI or path, an argv array, a { file, fs } object or an Endpoint, not undefined'));
  });

  it('a missing file: ERR_IO with errno, syscall and path as Node has them', async () => {
    const missing = path.join(dir, 'no-such.img');
    const err = (await rejection(copy(missing, 'null:'))) as NbdStreamError;
    expect(err).toBeInstanceOf(NbdStreamError);
    expect({ code: err.code, errno: err.errno, syscall: err.syscall, path: err.path, endpoint: err.endpoint }).toEqual({
      code: 'ERR_IO',
      errno: -2,
      syscall: 'stat',
      path: missing,
      endpoint: missing,
    });
    expect(getSystemErrorName(err.errno!)).toBe('ENOENT');
    expect(err.message).toBe('cannot open: ENOENT no such file or directory');
  });

  it('library errors name options as the library does; the CLI says its flags', async () => {
    const f = path.join(dir, 'small.img');
    fs.writeFileSync(f, Buffer.alloc(4096));
    const bad = (await rejection(copy(f, 'null:', { requestSize: 3000 }))) as NbdStreamError;
    expect([bad.code, bad.option, bad.message]).toEqual(['ERR_USAGE', 'requestSize', 'requestSize must be a power of two between 4096 and 33554432, not 3000']);
    const hash = (await rejection(copy(f, 'null:', { blkhash: 'crc32' }))) as NbdStreamError;
    expect(hash.message).toBe('blkhash: expected ALG[/BLOCKSIZE] with ALG one of md5, sha1, sha256, sha512 and BLOCKSIZE like 4k or 65536, not "crc32"');
    const bitmap = (await rejection(copy(f, 'null:', { dirtyBitmap: 'b0' }))) as NbdStreamError;
    expect(bitmap.message).toBe('dirtyBitmap needs an NBD source (qemu:dirty-bitmap:b0), not a file');
    const size = (await rejection(serve('memory:', { path: path.join(dir, 'm.sock') }))) as NbdStreamError;
    expect(size.describe()).toBe('memory:: memory: needs the size option');

    const cli = await run(['--dirty-bitmap=b0', f, 'null:']);
    expect([cli.status, cli.stderr]).toEqual([1, `nbdstream: ${f}: --dirty-bitmap needs an NBD source (qemu:dirty-bitmap:b0), not a file\n`]);
    const cli2 = await run(['--request-size=3000', f, 'null:']);
    expect(cli2.stderr).toBe('nbdstream: --request-size must be a power of two between 4096 and 33554432, not 3000\n');
  });
});

describe('{ file, fs } endpoints', () => {
  it('a file of one volume is told from the same path (and inode number) in another, but not from itself', async () => {
    const data = Buffer.alloc(64 * 1024, 3);
    const vol = new Volume();
    vol.writeFileSync('/a.img', data);
    const other = new Volume();
    other.writeFileSync('/a.img', Buffer.alloc(4096, 1));
    await copy({ file: '/a.img', fs: vol }, { file: '/a.img', fs: other });
    expect((other.readFileSync('/a.img') as Buffer).equals(data)).toBe(true);
    const same = (await rejection(copy({ file: '/a.img', fs: vol }, { file: '/a.img', fs: vol }))) as NbdStreamError;
    expect([same.code, same.describe()]).toEqual(['ERR_SAME_FILE', '/a.img: is the same file as the source: refusing to copy it onto itself']);
    expect((vol.readFileSync('/a.img') as Buffer).equals(data)).toBe(true);
  });
});

describe('README: a copy into a memfs volume', () => {
  // the README's example, as it is there
  it('copies an nbdkit export into memory', async () => {
    const src = await kit('sparse-random', ['8M', 'percent=10', 'runlength=65536', 'seed=7'], { readOnly: true });
    const vol = new Volume();
    vol.mkdirSync('/images');
    const summary = await copy(src.uri, { file: '/images/disk.img', fs: vol });
    const image = vol.readFileSync('/images/disk.img') as Buffer;
    expect(sha256(image)).toBe(nbdcopyHash(src.uri));
    expect(summary.bytesRead).toBeLessThan(4 * MiB); // only the data extents were read
    // (the export has 610304 bytes of data in 64 KiB runs: nbdinfo --map --totals)
    expect(summary.bytesRead).toBeGreaterThanOrEqual(610304);
    expect(image.some((b) => b !== 0)).toBe(true);
    // and nothing else: the target is zero-initialised, so its holes cost no request
    expect([image.length, summary.size, summary.bytesZeroed, summary.requests.zero]).toEqual([8 * MiB, 8 * MiB, 0, 0]);
  });
});
