/**
 * The built-in NBD server serving dirty bitmaps (ExportDefinition.dirtyBitmaps) as
 * qemu:dirty-bitmap:NAME meta contexts: nbdinfo --map, our NbdClient (several contexts in one
 * reply, REQ_ONE via the raw connection) and the CLI's --dirty-bitmap incremental copy. Issue 8.
 *
 * External tools run with async spawn: the server lives in this process.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MemoryEndpoint } from '../../lib/endpoints/memory.js';
import { NbdClient } from '../../lib/nbd/client.js';
import { NbdConnection } from '../../lib/nbd/connection.js';
import { parseNbdUri } from '../../lib/nbd/uri.js';
import * as P from '../../lib/nbd/protocol.js';
import { NbdServer, type ExportDefinition } from '../../lib/nbd/server.js';
import { tmpDir } from '../helpers/servers.js';
import { run } from '../helpers/cli.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const DIRTY = [
  { offset: MiB, length: 64 * KiB },
  { offset: 5 * MiB, length: MiB },
];

const dir = tmpDir('nbdstream-srvbitmap-');
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
let cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

let nSock = 0;
async function serve(defs: ExportDefinition[]): Promise<string> {
  const server = new NbdServer(defs);
  await server.listen({ path: path.join(dir, `s${nSock++}`) });
  cleanups.push(() => server.close(200));
  return server.uri!;
}

function exec(cmd: string, args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.on('error', reject);
    p.on('close', (status) => resolve({ status, stdout: out, stderr: err }));
  });
}

/** [offset, length, flags] lines of nbdinfo --map. */
async function nbdinfoMap(uri: string, context: string): Promise<Array<[number, number, number]>> {
  const r = await exec('nbdinfo', [`--map=${context}`, uri]);
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  return r.stdout
    .split('\n')
    .map((l) => /^\s*(\d+)\s+(\d+)\s+(\d+)/.exec(l))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => [Number(m[1]), Number(m[2]), Number(m[3])]);
}

const source = () => new MemoryEndpoint(randomBytes(SIZE));

describe('NbdServer: qemu:dirty-bitmap:NAME', () => {
  it('nbdinfo --map=qemu:dirty-bitmap:b0 sees the dirty ranges; a function source works too; LIST lists the bitmaps', async () => {
    const uri = await serve([
      { name: '', endpoint: source(), dirtyBitmaps: { b0: DIRTY, b1: async (o, l) => [{ offset: o, length: Math.min(l, 4096), dirty: false }, { offset: o + 4096, length: 4096 }] } },
    ]);
    expect(await nbdinfoMap(uri, 'qemu:dirty-bitmap:b0')).toEqual([
      [0, MiB, 0],
      [MiB, 64 * KiB, 1],
      [MiB + 64 * KiB, 4 * MiB - 64 * KiB, 0],
      [5 * MiB, MiB, 1],
      [6 * MiB, 2 * MiB, 0],
    ]);
    // b1 says: clean 4 KiB, dirty 4 KiB, the rest (unmentioned) clean — at every request offset
    expect((await nbdinfoMap(uri, 'qemu:dirty-bitmap:b1')).slice(0, 3)).toEqual([
      [0, 4096, 0],
      [4096, 4096, 1],
      [8192, SIZE - 8192, 0],
    ]);
    const list = await exec('nbdinfo', ['--json', uri]);
    expect(list.status).toBe(0);
    const contexts = JSON.parse(list.stdout).exports[0].contexts as string[];
    expect(contexts).toEqual(['base:allocation', 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:b1']);
  });

  it('NbdClient: one chunk per negotiated context in each reply, clipped to the request; REQ_ONE honoured', async () => {
    const uri = await serve([{ name: '', endpoint: source(), dirtyBitmaps: { b0: DIRTY } }]);
    const c = await NbdClient.connect(uri, { metaContexts: ['base:allocation', 'qemu:dirty-bitmap:b0'] });
    cleanups.push(() => c.close().catch(() => undefined));
    const m = await c.blockStatusContexts(MiB - 4096, 2 * MiB, ['base:allocation', 'qemu:dirty-bitmap:b0']);
    expect(m.get('base:allocation')).toEqual([{ offset: MiB - 4096, length: 2 * MiB, flags: 0 }]);
    expect(m.get('qemu:dirty-bitmap:b0')).toEqual([
      { offset: MiB - 4096, length: 4096, flags: 0 },
      { offset: MiB, length: 64 * KiB, flags: 1 },
      { offset: MiB + 64 * KiB, length: 2 * MiB - 4096 - 64 * KiB, flags: 0 },
    ]);

    const conn = await NbdConnection.open(parseNbdUri(uri), {
      endpoint: uri,
      structuredReplies: true,
      metaContexts: ['qemu:dirty-bitmap:b0'],
      maxRequests: 8,
      maxBytesInFlight: 16 * MiB,
    });
    cleanups.push(() => conn.close().catch(() => undefined));
    const id = conn.info.metaContexts.get('qemu:dirty-bitmap:b0')!;
    expect(id).toBeGreaterThan(0);
    const r = await conn.request(P.NBD_CMD_BLOCK_STATUS, P.NBD_CMD_FLAG_REQ_ONE, MiB + 4096, 6 * MiB, undefined, undefined, id);
    expect(r.extents).toEqual([{ length: 60 * KiB, flags: 1 }]);
  });

  it('CLI --dirty-bitmap=b0: an incremental copy into an existing file changes exactly the dirty ranges', async () => {
    const src = source();
    const uri = await serve([{ name: '', endpoint: src, dirtyBitmaps: { b0: DIRTY } }]);
    const target = path.join(dir, 'target.img');
    fs.writeFileSync(target, Buffer.alloc(SIZE, 0xee));
    const r = await run(['--dirty-bitmap=b0', uri, target]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const got = fs.readFileSync(target);
    expect(got.length).toBe(SIZE);
    const expected = Buffer.alloc(SIZE, 0xee);
    for (const d of DIRTY) src.buffer.copy(expected, d.offset, d.offset, d.offset + d.length);
    for (const d of DIRTY) expect(got.subarray(d.offset, d.offset + d.length).equals(src.buffer.subarray(d.offset, d.offset + d.length))).toBe(true);
    expect(got.equals(expected)).toBe(true);
  });

  it('CLI --dirty-bitmap against a server without the bitmap: one clean error line', async () => {
    const uri = await serve([{ name: '', endpoint: source(), dirtyBitmaps: { other: DIRTY } }]);
    const target = path.join(dir, 'target2.img');
    fs.writeFileSync(target, Buffer.alloc(SIZE, 0xee));
    const r = await run(['--dirty-bitmap=b0', uri, target]);
    expect(r.status).toBe(1);
    expect(r.stderr.split('\n').filter(Boolean)).toHaveLength(1);
    expect(r.stderr).toMatch(/does not export dirty bitmap "b0" \(meta context qemu:dirty-bitmap:b0\)/);
    expect(fs.readFileSync(target).equals(Buffer.alloc(SIZE, 0xee))).toBe(true);
  });
});
