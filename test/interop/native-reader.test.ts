/**
 * Replies received by the native reader thread (native/socket_reader.c) and by libuv reads
 * (NBDSTREAM_NATIVE_READER=0) must give the same bytes and the same errors.
 */
import { afterEach, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { NbdStreamError } from '../../lib/errors.js';
import { NbdClient } from '../../lib/nbd/client.js';
import { NbdServer } from '../../lib/nbd/server.js';
import { MemoryEndpoint } from '../../lib/endpoints/memory.js';
import { nbdcopyHash, nbdkit, sha256, tmpDir, type Server } from '../helpers/servers.js';
import { run } from '../helpers/cli.js';

const MiB = 2 ** 20;
let cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => undefined);
  cleanups = [];
  delete process.env.NBDSTREAM_NATIVE_READER;
});

async function connect(uri: string, o: Parameters<typeof NbdClient.connect>[1] = {}): Promise<NbdClient> {
  const c = await NbdClient.connect(uri, o);
  cleanups.push(() => c.close());
  return c;
}

async function start(plugin: string, args: string[]): Promise<Server> {
  const s = await nbdkit(plugin, args);
  cleanups.push(() => s.stop());
  return s;
}

describe.each([
  ['native', '1'],
  ['libuv', '0'],
] as const)('replies received by %s', (receiver, env) => {
  it('reads sparse-random over 4 connections (odd sizes, with block status in between) identical to nbdcopy', async () => {
    process.env.NBDSTREAM_NATIVE_READER = env;
    const s = await start('sparse-random', ['64M', 'percent=30', 'seed=11']);
    const c = await connect(s.uri, { connections: 4 });
    expect(c.receiver).toBe(receiver);
    expect(await c.joined()).toBe(4);
    const buf = Buffer.alloc(64 * MiB);
    const parts = [];
    // odd sizes: payloads end mid-way through the server's socket writes
    for (let o = 0; o < buf.length; ) {
      const n = Math.min(buf.length - o, 3 * MiB + 4096);
      parts.push(c.pread(o, n, buf.subarray(o, o + n)));
      o += n;
    }
    const status = c.blockStatus(0, 64 * MiB);
    await Promise.all(parts);
    expect((await status).length).toBeGreaterThan(1);
    expect(sha256(buf)).toBe(nbdcopyHash(s.uri));
  });

  it('a server that cuts the connection mid-reply fails the read with ERR_CLOSED, and the client stays failed', async () => {
    process.env.NBDSTREAM_NATIVE_READER = env;
    const dir = tmpDir();
    cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }));
    const data = randomBytes(4 * MiB);
    const server = new NbdServer(new MemoryEndpoint(data, 'memory:'), { faults: { closeAfterBytes: MiB + 100 } });
    await server.listen({ path: path.join(dir, 'sock') });
    cleanups.push(() => server.close(200));
    const c = await connect(server.uri!);
    expect(c.receiver).toBe(receiver);
    expect((await c.pread(0, MiB)).data.equals(data.subarray(0, MiB))).toBe(true);
    const dest = Buffer.alloc(2 * MiB);
    const err = await c.pread(MiB, 2 * MiB, dest).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(NbdStreamError);
    expect((err as NbdStreamError).code).toBe('ERR_CLOSED');
    expect((err as NbdStreamError).message).toBe('server closed the connection in the middle of a reply with 1 request pending');
    await expect(c.pread(0, 4096)).rejects.toMatchObject({ code: 'ERR_CLOSED' });
  });

  // A hostile server whose read replies carry as many bytes as asked for, but overlapping:
  // counting bytes would take them as complete and leave the rest of the target unwritten.
  it.each([
    ['repeated-chunk', 'OFFSET_DATA chunk 0+131072 overlaps 0+131072 already received for the read 0+262144'],
    ['hole-over-data', 'OFFSET_HOLE chunk 131072+65536 overlaps 131072+65536 already received for the read 0+262144'],
  ] as const)('fails a copy whose server sends overlapping read chunks (%s), exit 1, --verify or not', async (violation, message) => {
    const dir = tmpDir();
    cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }));
    const server = new NbdServer(new MemoryEndpoint(randomBytes(256 * 1024), 'memory:'), { faults: { violation } });
    await server.listen({ path: path.join(dir, 'sock') });
    cleanups.push(() => server.close(200));
    for (const verify of [[], ['--verify']]) {
      const r = await run([...verify, server.uri!, path.join(dir, 'out.img')], { env: { NBDSTREAM_NATIVE_READER: env } });
      expect(r.stderr).toBe(`nbdstream: ${server.uri}: offset 0: ${message}\n`);
      expect(r.status).toBe(1);
    }
    // the setting the CLI ran with chooses this receiver
    process.env.NBDSTREAM_NATIVE_READER = env;
    const c = await connect(server.uri!);
    expect(c.receiver).toBe(receiver);
  });

  it('maps the all-zero -S blocks of read data as it arrives (zeroBlocks), natively only, missing no block', async () => {
    process.env.NBDSTREAM_NATIVE_READER = env;
    const dir = tmpDir();
    cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }));
    const K = 1024;
    const data = randomBytes(MiB);
    data.fill(0, 64 * K, 72 * K); // two aligned all-zero blocks
    data.fill(0, 200 * K + 100, 204 * K + 100); // zeroes across two blocks: no whole block
    // served with two holes (OFFSET_HOLE chunks in structured replies): an aligned one, and an
    // unaligned one holding no whole block
    const holes = [
      { offset: 512 * K, length: 8 * K },
      { offset: 768 * K + 100, length: 4 * K },
    ];
    for (const h of holes) data.fill(0, h.offset, h.offset + h.length);
    const server = new NbdServer(new MemoryEndpoint(data, 'memory:', holes));
    await server.listen({ path: path.join(dir, 'sock') });
    cleanups.push(() => server.close(200));
    const map = (...runs: Array<[number, number]>) => (receiver === 'native' ? { blockSize: 4096, runs: runs.map(([offset, length]) => ({ offset, length })) } : undefined);
    // our server offers extended headers (32-byte reply headers): with them, without, and simple replies
    for (const [structuredReplies, extendedHeaders] of [
      [true, true],
      [true, false],
      [false, false],
    ]) {
      const c = await connect(server.uri!, { zeroBlockSize: 4096, structuredReplies, extendedHeaders });
      expect(c.receiver).toBe(receiver);
      expect(c.extendedHeaders).toBe(extendedHeaders);
      const read = async (offset: number, length: number) => {
        const r = await c.pread(offset, length);
        expect(r.data.equals(data.subarray(offset, offset + length))).toBe(true);
        return r.zeroBlocks;
      };
      expect(await read(128 * K, 256 * K)).toEqual(map()); // only the zero run across blocks
      expect(await read(100, 8 * K)).toEqual(map()); // unaligned edges are the request's own
      expect(await read(0, 128 * K)).toEqual(map([64 * K, 8 * K])); // one run of two blocks
      expect(await read(66 * K, 10 * K)).toEqual(map([68 * K, 4 * K])); // only whole blocks inside
      // structured: the data chunks around an aligned hole were checked whole (the hole itself
      // is a hole, not data); around an unaligned one a block straddles a chunk edge, so there is
      // no map. Simple replies carry the holes as zero bytes: the aligned hole is two all-zero
      // blocks, the other holds none.
      expect(await read(480 * K, 64 * K)).toEqual(structuredReplies ? map() : map([512 * K, 8 * K]));
      expect(await read(736 * K, 64 * K)).toEqual(structuredReplies ? undefined : map());
      await c.close();
    }
    const plain = await connect(server.uri!);
    expect((await plain.pread(0, 128 * K)).zeroBlocks).toBeUndefined();
  });
});
