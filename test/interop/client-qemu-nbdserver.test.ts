import { afterEach, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../../lib/nbd/client.js';
import { NBD_STATE_ZERO } from '../../lib/nbd/protocol.js';
import { nbdServer, nbdcopyHash, qemuNbd, sha256, tmpDir, type Server } from '../helpers/servers.js';

let cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

/** A 16 MiB sparse file with 64 KiB of bytes at 1 MiB and 4 KiB at 9 MiB; returns its path and contents. */
function sparseFile(dir: string): { file: string; content: Buffer } {
  const file = path.join(dir, 'disk.img');
  const content = Buffer.alloc(16 << 20);
  for (let i = 0; i < 65536; i++) content[(1 << 20) + i] = (i % 251) + 1;
  content.fill(0xab, 9 << 20, (9 << 20) + 4096);
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, content.length);
  fs.writeSync(fd, content, 1 << 20, 65536, 1 << 20);
  fs.writeSync(fd, content, 9 << 20, 4096, 9 << 20);
  fs.closeSync(fd);
  return { file, content };
}

async function open(s: Server, o = {}): Promise<NbdClient> {
  const c = await NbdClient.connect(s.uri, o);
  cleanups.push(() => c.close());
  return c;
}

describe('NbdClient against qemu-nbd', () => {
  it('receives OFFSET_HOLE chunks as hole ranges and reads the right bytes (raw)', async () => {
    const dir = tmpDir();
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const { file, content } = sparseFile(dir);
    const s = await qemuNbd(file);
    cleanups.push(() => s.stop());
    const c = await open(s);
    expect(c.size).toBe(16 << 20);
    expect(c.structuredReplies).toBe(true);
    const r = await c.pread(0, 4 << 20);
    expect(sha256(r.data)).toBe(sha256(content.subarray(0, 4 << 20)));
    const holeBytes = r.holes.reduce((n, h) => n + h.length, 0);
    expect(holeBytes).toBeGreaterThanOrEqual((4 << 20) - 65536 - 2 * 65536); // all but the data (and its alignment)
    for (const h of r.holes) expect(content.subarray(h.offset, h.offset + h.length).equals(Buffer.alloc(h.length))).toBe(true);
    const ex = await c.blockStatus(0, c.size);
    const data = ex.filter((e) => !(e.flags & NBD_STATE_ZERO));
    expect(data.some((e) => e.offset <= 1 << 20 && e.offset + e.length >= (1 << 20) + 65536)).toBe(true);
    expect(data.some((e) => e.offset <= 9 << 20 && e.offset + e.length >= (9 << 20) + 4096)).toBe(true);
    const all = Buffer.alloc(16 << 20);
    await c.pread(0, 16 << 20, all);
    expect(sha256(all)).toBe(sha256(content));
  });

  it('writes and zeroes a qcow2 image, cross-checked by nbdcopy and qemu-img', async () => {
    const dir = tmpDir();
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, '32M']);
    const s = await qemuNbd(file, { format: 'qcow2' });
    const c = await open(s);
    const data = Buffer.alloc(1 << 20, 0x42);
    await c.pwrite(3 << 20, data);
    await c.zero((3 << 20) + 4096, 4096);
    await c.flush();
    const expected = Buffer.alloc(32 << 20);
    data.copy(expected, 3 << 20);
    expected.fill(0, (3 << 20) + 4096, (3 << 20) + 8192);
    expect(nbdcopyHash(s.uri)).toBe(sha256(expected));
    await c.close();
    await s.stop();
    const raw = path.join(dir, 'out.raw');
    execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', file, raw]);
    expect(sha256(fs.readFileSync(raw))).toBe(sha256(expected));
  });
});

describe('NbdClient against nbd-server (simple replies)', () => {
  it('reads, writes and zeroes with simple replies and no block status', async () => {
    const dir = tmpDir();
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, 'disk.img');
    const content = Buffer.alloc(8 << 20);
    for (let i = 0; i < content.length; i += 4096) content.writeUInt32BE(i, i);
    fs.writeFileSync(file, content);
    const s = await nbdServer(file);
    cleanups.push(() => s.stop());
    const c = await open(s, { connections: 2 });
    expect(c.size).toBe(8 << 20);
    expect(c.structuredReplies).toBe(false);
    expect(c.metaContexts.size).toBe(0);
    await expect(c.blockStatus(0, 4096)).rejects.toMatchObject({ code: 'ERR_UNSUPPORTED', message: 'server does not support meta context base:allocation' });
    const r = await c.pread(0, 8 << 20);
    expect(sha256(r.data)).toBe(sha256(content));
    expect(r.holes).toEqual([]);
    const w = Buffer.alloc(65536, 0x77);
    await c.pwrite(1 << 20, w);
    w.copy(content, 1 << 20);
    if (c.canZero) {
      await c.zero(2 << 20, 65536);
      content.fill(0, 2 << 20, (2 << 20) + 65536);
    }
    await Promise.all([c.pread(0, 4 << 20), c.pread(4 << 20, 4 << 20)]);
    expect(nbdcopyHash(s.uri)).toBe(sha256(content));
    await c.close();
    expect(sha256(fs.readFileSync(file))).toBe(sha256(content));
  });
});
