import { afterEach, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import { NbdClient } from '../../lib/nbd/client.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../../lib/nbd/protocol.js';
import { logLines, nbdcopyHash, nbdkit, sha256, type Server } from '../helpers/servers.js';

const GiB = 2 ** 30;
let servers: Server[] = [];
let clients: NbdClient[] = [];
afterEach(async () => {
  await Promise.allSettled(clients.map((c) => c.close()));
  await Promise.allSettled(servers.map((s) => s.stop()));
  servers = [];
  clients = [];
});
async function start(plugin: string, args: string[] = [], o = {}): Promise<Server> {
  const s = await nbdkit(plugin, args, o);
  servers.push(s);
  return s;
}
async function connect(uri: string, o = {}): Promise<NbdClient> {
  const c = await NbdClient.connect(uri, o);
  clients.push(c);
  return c;
}

describe('NbdClient against nbdkit', () => {
  it('negotiates structured replies, base:allocation and export info (memory)', async () => {
    const s = await start('memory', ['64M']);
    const c = await connect(s.uri);
    expect(c.size).toBe(64 << 20);
    expect(c.structuredReplies).toBe(true);
    expect([...c.metaContexts.keys()]).toEqual(['base:allocation']);
    expect(c.readOnly).toBe(false);
    expect(c.canZero && c.canTrim && c.canFlush && c.canFastZero && c.canMultiConn).toBe(true);
  });

  it('writes, reads back, zeroes, trims and flushes (memory), checked by nbdcopy', async () => {
    const s = await start('memory', ['8M']);
    const c = await connect(s.uri);
    const data = Buffer.alloc(3 << 20);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 12)) & 0xff;
    await c.pwrite(1 << 20, data);
    await c.zero((2 << 20) + 4096, 8192);
    data.fill(0, (1 << 20) + 4096, (1 << 20) + 4096 + 8192);
    await c.flush();
    const { data: back, holes } = await c.pread(1 << 20, 3 << 20);
    expect(sha256(back)).toBe(sha256(data));
    expect(holes).toEqual([]);
    const whole = Buffer.alloc(8 << 20);
    data.copy(whole, 1 << 20);
    expect(nbdcopyHash(s.uri)).toBe(sha256(whole));
    await c.trim(0, 1 << 20);
    await c.zero(0, 8 << 20, { noHole: true, fastZero: true });
    expect(sha256((await c.pread(0, 8 << 20)).data)).toBe(sha256(Buffer.alloc(8 << 20)));
  });

  it('reports block status as nbdkit data describes it, across a 4 GiB+1 export', async () => {
    const s = await start('data', ['1 @1073741823 1 @4294967295 1 1', 'size=4294967297']);
    const c = await connect(s.uri);
    expect(c.size).toBe(4 * GiB + 1);
    const ex = await c.blockStatus(0, c.size);
    expect(ex[0]).toEqual({ offset: 0, length: 32768, flags: 0 });
    expect(ex.at(-1)!.offset + ex.at(-1)!.length).toBeLessThanOrEqual(c.size);
    // Walk the whole export the way a copier does: ask again from where each answer stops.
    const all = [];
    for (let o = 0; o < c.size; ) {
      const e = await c.blockStatus(o, c.size - o);
      all.push(...e);
      o = e.at(-1)!.offset + e.at(-1)!.length;
    }
    // consecutive answers may split a run where one answer stopped: merge before comparing
    const merged: typeof all = [];
    for (const e of all) {
      const last = merged.at(-1);
      if (last && last.flags === e.flags && last.offset + last.length === e.offset) last.length += e.length;
      else merged.push({ ...e });
    }
    const data = merged.filter((e) => !(e.flags & NBD_STATE_ZERO));
    expect(data.map((e) => [e.offset, e.length])).toEqual([
      [0, 32768],
      [GiB - 32768, 32768],
      [4 * GiB - 32768, 32769],
    ]);
    expect(all.filter((e) => e.flags === (NBD_STATE_HOLE | NBD_STATE_ZERO)).reduce((n, e) => n + e.length, 0)).toBe(c.size - 3 * 32768 - 1);
    const r = await c.pread(4 * GiB - 4096, 4097);
    expect([...r.data.subarray(4095)]).toEqual([1, 1]);
  });

  it('reads sparse-random content identical to nbdcopy, over 4 connections', async () => {
    const s = await start('sparse-random', ['64M', 'percent=30', 'seed=7']);
    const c = await connect(s.uri, { connections: 4 });
    expect(await c.joined()).toBe(4);
    const buf = Buffer.alloc(64 << 20);
    const parts = [];
    for (let o = 0; o < buf.length; o += 1 << 20) parts.push(c.pread(o, 1 << 20, buf.subarray(o)));
    await Promise.all(parts);
    expect(sha256(buf)).toBe(nbdcopyHash(s.uri));
  });

  it('reads the pattern plugin at unaligned offsets and lengths', async () => {
    const s = await start('pattern', ['1G']);
    const c = await connect(s.uri);
    const r = await c.pread(GiB - 1000, 1000);
    // pattern: each 8-byte word holds its own offset, big-endian
    const expected = Buffer.alloc(1008);
    for (let o = GiB - 1008, i = 0; i < 1008; o += 8, i += 8) expected.writeBigUInt64BE(BigInt(o), i);
    expect(r.data.equals(expected.subarray(8))).toBe(true);
  });

  it('reads nbdkit null as zeroes, splits reads above the maximum payload', async () => {
    const s = await start('null', ['100M'], { log: true });
    const c = await connect(s.uri);
    const r = await c.pread(0, 80 << 20);
    expect(r.data.equals(Buffer.alloc(80 << 20))).toBe(true);
    await c.close();
    const reads = logLines(s.logFile!, ['Read']).filter((l) => l.includes('count='));
    // (nbdkit logs requests as its threads take them: in any order)
    const pieces = reads.map((l) => /offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l)!.slice(1).map(Number)).sort((a, b) => a[0] - b[0]);
    expect(pieces).toEqual([
      [0, 32 << 20],
      [32 << 20, 32 << 20],
      [64 << 20, 16 << 20],
    ]);
  });

  it('cuts a long read into readRequestSize requests, sent together and settled as one', async () => {
    const s = await start('pattern', ['64M'], { log: true });
    const c = await connect(s.uri, { readRequestSize: 256 * 1024, zeroBlockSize: 4096 });
    const r = await c.pread(8 << 20, 4 << 20);
    const expected = Buffer.alloc(4 << 20);
    for (let i = 0; i < expected.length; i += 8) expected.writeBigUInt64BE(BigInt((8 << 20) + i), i);
    expect(r.data.equals(expected)).toBe(true);
    // every piece was checked as it arrived (cut on block boundaries): no zero blocks in the pattern
    expect(c.receiver).toBe('native');
    expect(r.zeroBlocks).toEqual({ blockSize: 4096, runs: [] });
    await c.close();
    const reads = logLines(s.logFile!, ['Read']).filter((l) => l.includes('count='));
    expect(reads.map((l) => /offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l)!.slice(1).map(Number)).sort((a, b) => a[0] - b[0])).toEqual(
      Array.from({ length: 16 }, (_, i) => [(8 << 20) + i * 262144, 262144]),
    );
  });

  it('sends the pieces of a cut read no faster than maxRequests allows (one at a time with 1)', async () => {
    const s = await start('pattern', ['4M'], { log: true });
    const c = await connect(s.uri, { readRequestSize: 256 * 1024, maxRequests: 1 });
    await c.pread(0, 1 << 20);
    await c.close();
    // the log in order: each piece asked only after the previous one was answered
    const lines = logLines(s.logFile!, ['Read']).map((l) => (l.includes('return=') ? 'answered' : /offset=(0x[0-9a-f]+)/.exec(l)![1]));
    expect(lines).toEqual(['0x0', 'answered', '0x40000', 'answered', '0x80000', 'answered', '0xc0000', 'answered']);
  });

  it('fails a cut read with the error of the piece that failed; the connection survives', async () => {
    const s = await start('eval', [
      'get_size=echo 4194304',
      'pread=if [ $4 -eq 1048576 ]; then echo "EIO bad sector" >&2; exit 1; fi; dd if=/dev/zero count=$3 iflag=count_bytes status=none',
    ]);
    const c = await connect(s.uri, { readRequestSize: 256 * 1024 });
    await expect(c.pread(0, 4 << 20)).rejects.toMatchObject({ code: 'ERR_SERVER', nbdError: 'EIO', command: 'NBD_CMD_READ', offset: 1048576 });
    expect((await c.pread(2 << 20, 1 << 20)).data.equals(Buffer.alloc(1 << 20))).toBe(true);
  });

  it('opens only one connection when the server does not allow multi-conn', async () => {
    const s = await start('memory', ['1M'], { filters: ['multi-conn'], log: true, options: [] });
    // multi-conn filter default mode advertises it only when safe; force it off:
    await s.stop();
    servers = [];
    const s2 = await start('memory', ['1M', 'multi-conn-mode=disable'], { filters: ['multi-conn'], log: true });
    const c = await connect(s2.uri, { connections: 4 });
    expect(c.canMultiConn).toBe(false);
    expect(await c.joined()).toBe(1);
    await c.close();
    expect(fs.readFileSync(s2.logFile!, 'utf8').match(/ Connect /g)).toHaveLength(1);
  });

  it('sends may-trim, NO_HOLE and FAST_ZERO exactly as asked (log filter)', async () => {
    const s = await start('memory', ['1M'], { log: true });
    const c = await connect(s.uri);
    await c.zero(0, 65536);
    await c.zero(65536, 65536, { noHole: true });
    await c.zero(131072, 4096, { fastZero: true });
    await c.close();
    const zeros = logLines(s.logFile!, ['Zero']).filter((l) => !l.includes('...Zero') && !l.includes('return='));
    expect(zeros.map((l) => l.replace(/^.*Zero id=\d+ /, '').replace(/ \.\.\.$/, ''))).toEqual([
      'offset=0x0 count=0x10000 trim=1 fua=0 fast=0',
      'offset=0x10000 count=0x10000 trim=0 fua=0 fast=0',
      'offset=0x20000 count=0x1000 trim=1 fua=0 fast=1',
    ]);
  });

  it('surfaces server errors with the NBD error name, command and offset; the connection survives', async () => {
    const s = await start('memory', ['16M', 'error-pread-rate=1', 'error-pread=EIO', 'error-pwrite-rate=1', 'error-pwrite=ENOSPC'], { filters: ['error'] });
    const c = await connect(s.uri);
    await expect(c.pread(4096, 4096)).rejects.toMatchObject({ code: 'ERR_SERVER', nbdError: 'EIO', command: 'NBD_CMD_READ', offset: 4096, endpoint: s.uri });
    await expect(c.pwrite(8192, Buffer.alloc(512))).rejects.toMatchObject({ code: 'ERR_SERVER', nbdError: 'ENOSPC', command: 'NBD_CMD_WRITE', offset: 8192 });
    expect((await c.blockStatus(0, 4096))[0].length).toBeGreaterThan(0);
  });

  it('refuses writes to a read-only export and out-of-range requests before sending', async () => {
    const s = await start('memory', ['1M'], { readOnly: true, log: true });
    const c = await connect(s.uri);
    expect(c.readOnly).toBe(true);
    await expect(c.pwrite(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'ERR_UNSUPPORTED', message: 'NBD_CMD_WRITE: export is read-only' });
    await expect(c.pread(1 << 20, 1)).rejects.toMatchObject({ code: 'ERR_RANGE' });
    await c.close();
    expect(logLines(s.logFile!)).toEqual([]);
  });

  it('works without extents (noextents) and without zero support (nozero)', async () => {
    const s = await start('data', ['1 @1048576 1', 'size=4M'], { filters: ['noextents'] });
    const c = await connect(s.uri);
    expect(await c.blockStatus(0, c.size)).toEqual([{ offset: 0, length: 4 << 20, flags: 0 }]);
    const s2 = await start('memory', ['1M', 'zeromode=none'], { filters: ['nozero'] });
    const c2 = await connect(s2.uri);
    expect(c2.canZero).toBe(false);
    await expect(c2.zero(0, 4096)).rejects.toMatchObject({ code: 'ERR_UNSUPPORTED', message: 'server does not support NBD_CMD_WRITE_ZEROES' });
  });

  it('matches out-of-order replies to their requests (delay filter)', async () => {
    const s = await start('pattern', ['64M', 'rdelay=200ms'], { filters: ['delay'] });
    // Long reads are slow, a block status is not: replies come back out of order.
    const c = await connect(s.uri);
    const order: string[] = [];
    const reads = [0, 1, 2, 3].map((i) => c.pread(i << 20, 1 << 20).then((r) => (order.push(`read${i}`), r)));
    const bs = c.blockStatus(0, 4096).then(() => order.push('bs'));
    const rs = await Promise.all(reads);
    await bs;
    expect(order[0]).toBe('bs');
    rs.forEach((r, i) => expect(r.data.readBigUInt64BE(8)).toBe(BigInt((i << 20) + 8)));
  });

  it('respects the server block size constraints (blocksize filter)', async () => {
    const s = await start('memory', ['1M', 'blocksize-minimum=512', 'blocksize-maximum=65536'], { filters: ['blocksize-policy'], log: true });
    const c = await connect(s.uri);
    expect(c.blockSize.minimum).toBe(512);
    expect(c.blockSize.maximum).toBeLessThanOrEqual(65536);
    await expect(c.pread(100, 512)).rejects.toMatchObject({ code: 'ERR_ALIGNMENT' });
    const data = Buffer.alloc(256 << 10, 0x5a);
    await c.pwrite(0, data);
    expect((await c.pread(0, 256 << 10)).data.equals(data)).toBe(true);
  });

  it('fails pending requests with a clear error when the server dies', async () => {
    const s = await start('pattern', ['1G', 'rdelay=2'], { filters: ['delay'] });
    const c = await connect(s.uri);
    const p = c.pread(0, 1 << 20);
    setTimeout(() => s.proc!.kill('SIGKILL'), 200);
    await expect(p).rejects.toMatchObject({ code: 'ERR_CLOSED', offset: 0, endpoint: s.uri, message: 'server closed the connection with 1 request pending' });
    await expect(c.pread(0, 1)).rejects.toMatchObject({ code: 'ERR_CLOSED' });
  });

  it('names the export that does not exist and the socket that refuses', async () => {
    const s = await start('memory', ['1M'], { filters: ['exportname'], options: [] });
    await expect(NbdClient.connect(`nbd+unix:///nope?socket=${s.socket}-missing`)).rejects.toMatchObject({
      code: 'ERR_CONNECT',
      message: `cannot connect to socket ${s.socket}-missing: ENOENT`,
    });
    const s2 = await start('memory', ['1M', 'exportname=good', 'exportname-strict=true'], { filters: ['exportname'] });
    await expect(NbdClient.connect(`nbd+unix:///bad?socket=${s2.socket}`)).rejects.toMatchObject({ code: 'ERR_HANDSHAKE', message: expect.stringMatching(/^export "bad" not found on the server/) });
    const ok = await connect(`nbd+unix:///good?socket=${s2.socket}`);
    expect(ok.size).toBe(1 << 20);
  });
});

describe('NbdClient against large holes', () => {
  it('asks block status for a 1 TiB hole in spans nbdkit answers (no 0xffffffff-length requests)', async () => {
    const dir = fs.mkdtempSync('/tmp/nbdstream-hole-');
    try {
      const file = `${dir}/hole.img`;
      fs.closeSync(fs.openSync(file, 'w'));
      fs.truncateSync(file, 2 ** 40);
      const s = await start('file', [file], { readOnly: true, log: true });
      const c = await connect(s.uri);
      let o = 0;
      let asks = 0;
      while (o < c.size) {
        const e = await c.blockStatus(o, c.size - o);
        expect(e.every((x) => x.flags === 3)).toBe(true);
        o = e.at(-1)!.offset + e.at(-1)!.length;
        asks++;
      }
      expect(asks).toBe(257); // 256 × (4 GiB − 64 KiB) and the remainder
      await c.close();
      expect(logLines(s.logFile!, ['Extents']).filter((l) => l.includes('count=0xffffffff'))).toEqual([]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
