import { describe, expect, it } from 'vitest';
import { clipExtents, ExtentMap } from '../../lib/extents.js';
import { splitZeroBlocks, isZero } from '../../lib/streams/zero-detect.js';
import { ExtentSource } from '../../lib/streams/extent-source.js';
import { Sink } from '../../lib/streams/sink.js';
import { Transform, pipelinePromise } from 'streamx';
import { BufferPool } from '../../lib/streams/buffer-pool.js';
import { MemoryEndpoint } from '../../lib/endpoints/memory.js';
import type { Chunk } from '../../lib/extents.js';

const MiB = 1 << 20;

describe('clipExtents', () => {
  it('clips to the range and merges adjacent runs of the same kind', () => {
    const runs = [
      { offset: 0, length: 100, zero: false },
      { offset: 100, length: 50, zero: false },
      { offset: 150, length: 100, zero: true },
      { offset: 250, length: 1000, zero: true },
    ];
    expect(clipExtents(runs, 50, 300)).toEqual([
      { offset: 50, length: 100, zero: false },
      { offset: 150, length: 200, zero: true },
    ]);
    expect(clipExtents(runs, 0, 10000)).toEqual([
      { offset: 0, length: 150, zero: false },
      { offset: 150, length: 1100, zero: true },
    ]);
  });
  it('rejects zero-length, backwards and gapped extents as protocol errors', () => {
    expect(() => clipExtents([{ offset: 0, length: 0, zero: false }], 0, 10, 'ep')).toThrow(expect.objectContaining({ code: 'ERR_PROTOCOL', endpoint: 'ep' }));
    expect(() =>
      clipExtents(
        [
          { offset: 0, length: 10, zero: false },
          { offset: 5, length: 10, zero: true },
        ],
        0,
        20,
      ),
    ).toThrow(/bad extent 5\+10/);
    expect(() => clipExtents([{ offset: 10, length: 10, zero: false }], 0, 20)).toThrow(/start at 10/);
  });
});

describe('ExtentMap', () => {
  it('asks once for a span the endpoint describes whole, and reuses it', async () => {
    const ep = new MemoryEndpoint(Buffer.alloc(8 * MiB), 'm', [{ offset: MiB, length: 6 * MiB }]);
    const map = new ExtentMap(ep, ep.size);
    expect(await map.get(0, 2 * MiB)).toEqual([
      { offset: 0, length: MiB, zero: false },
      { offset: MiB, length: MiB, zero: true },
    ]);
    expect(await map.get(2 * MiB, 6 * MiB)).toEqual([
      { offset: 2 * MiB, length: 5 * MiB, zero: true },
      { offset: 7 * MiB, length: MiB, zero: false },
    ]);
    expect(ep.log).toEqual([`extents 0+${8 * MiB}`]);
  });
});

describe('ExtentMap on a server that answers 4 GiB at a time', () => {
  it('asks for the following spans ahead, in one batch, and each span once', async () => {
    const GiB = 2 ** 30;
    const size = 64 * GiB;
    const asked: number[] = [];
    let inFlight = 0;
    let maxInFlight = 0;
    const ep = {
      name: 'virtual',
      size,
      async extents(offset: number, length: number) {
        asked.push(offset);
        inFlight++;
        maxInFlight = Math.max(maxInFlight, inFlight);
        await new Promise((r) => setTimeout(r, 1));
        inFlight--;
        return [{ offset, length: Math.min(length, 4 * GiB), zero: true }];
      },
    } as unknown as MemoryEndpoint;
    const map = new ExtentMap(ep, size);
    for (let o = 0; o < size; o += 128 * MiB) expect(await map.get(o, 128 * MiB)).toEqual([{ offset: o, length: 128 * MiB, zero: true }]);
    expect(asked).toEqual(Array.from({ length: 16 }, (_, i) => i * 4 * GiB));
    expect(map.requests).toBe(16);
    expect(maxInFlight).toBeGreaterThanOrEqual(8);
  });
});

describe('zero detection (-S)', () => {
  it('isZero compares whole ranges', () => {
    const b = Buffer.alloc(100000);
    expect(isZero(b, 0, b.length)).toBe(true);
    b[70000] = 1;
    expect(isZero(b, 0, b.length)).toBe(false);
    expect(isZero(b, 70001, b.length)).toBe(true);
  });
  it('splits at N-aligned zero blocks by absolute offset, merging runs; unaligned edges stay data', () => {
    const data = Buffer.alloc(5 * 4096 + 100);
    data[0] = 1; // in the unaligned head
    data.fill(7, 3 * 4096, 3 * 4096 + 10);
    // the chunk starts 100 bytes before a 4096 boundary
    const c: Chunk = { offset: 4096 - 100, length: data.length, kind: 'data', data };
    const out = splitZeroBlocks(c, 4096).map((x) => `${x.kind} ${x.offset}+${x.length}`);
    expect(out).toEqual(['data 3996+100', 'zero 4096+8192', 'data 12288+4096', 'zero 16384+8192']);
    // a chunk shorter than N, and an unaligned tail, stay data
    expect(splitZeroBlocks({ offset: 0, length: 100, kind: 'data', data: Buffer.alloc(100) }, 4096)).toHaveLength(1);
    const t = splitZeroBlocks({ offset: 0, length: 4196, kind: 'data', data: Buffer.alloc(4196) }, 4096);
    expect(t.map((x) => `${x.kind} ${x.offset}+${x.length}`)).toEqual(['zero 0+4096', 'data 4096+100']);
  });
  it('given the request size, splits as nbdcopy does per piece: zero runs end at pieces, the unaligned tail is apart, blocks larger than a piece are not found', () => {
    const show = (cs: Chunk[]) => cs.map((x) => `${x.kind} ${x.offset}+${x.length}`);
    // four 16 KiB pieces and a 100-byte tail; data in the first block and in the last whole block
    const data = Buffer.alloc(4 * 16384 + 100);
    data[0] = 1;
    data[4 * 16384 - 1] = 1;
    let released = 0;
    const c: Chunk = { offset: 0, length: data.length, kind: 'data', data, release: () => released++ };
    const parts = splitZeroBlocks(c, 4096, 16384);
    expect(show(parts)).toEqual(['data 0+4096', 'zero 4096+12288', 'zero 16384+16384', 'zero 32768+16384', 'zero 49152+12288', 'data 61440+4096', 'data 65536+100']);
    for (const p of parts) p.release?.();
    expect(released).toBe(1);
    expect(show(splitZeroBlocks(c, 4096))).toEqual(['data 0+4096', 'zero 4096+57344', 'data 61440+4196']);
    expect(splitZeroBlocks(c, 32768, 16384)).toEqual([c]);
  });
  it('splits a chunk whose zero blocks for this N are known (zeroBlocks) by them, unread; for another N it looks', () => {
    // the bytes say all zero: only the map is used for N = 4096
    const data = Buffer.alloc(5 * 4096 + 100);
    const c: Chunk = { offset: 4096 - 100, length: data.length, kind: 'data', data, zeroBlocks: { blockSize: 4096, runs: [{ offset: 12288, length: 4096 }, { offset: 4096, length: 4096 }] } };
    const show = (cs: Chunk[]) => cs.map((x) => `${x.kind} ${x.offset}+${x.length}`);
    expect(show(splitZeroBlocks(c, 4096))).toEqual(['data 3996+100', 'zero 4096+4096', 'data 8192+4096', 'zero 12288+4096', 'data 16384+8192']);
    expect(splitZeroBlocks({ ...c, zeroBlocks: { blockSize: 4096, runs: [] } }, 4096)).toHaveLength(1);
    expect(show(splitZeroBlocks(c, 512))).toEqual(['data 3996+100', 'zero 4096+20480']);
    // touching runs (from two parts of one read) make one zero chunk; the data parts share the release
    let released = 0;
    const d: Chunk = { offset: 0, length: 16384, kind: 'data', data: Buffer.alloc(16384, 1), release: () => released++, zeroBlocks: { blockSize: 4096, runs: [{ offset: 4096, length: 4096 }, { offset: 8192, length: 4096 }] } };
    const parts = splitZeroBlocks(d, 4096);
    expect(show(parts)).toEqual(['data 0+4096', 'zero 4096+8192', 'data 12288+4096']);
    for (const p of parts) p.release?.();
    expect(released).toBe(1);
  });
});

describe('ExtentSource piece planning', () => {
  async function chunks(ep: MemoryEndpoint, o = {}): Promise<string[]> {
    const out: string[] = [];
    for await (const c of new ExtentSource(ep, o)) out.push(`${(c as Chunk).kind} ${(c as Chunk).offset}+${(c as Chunk).length}`);
    return out;
  }
  it('reads pieces holding data whole and sends each zero run once; the sink cuts zero requests at 128 MiB', async () => {
    const size = 300 * MiB;
    const buf = Buffer.alloc(size);
    buf[0] = 1;
    buf[200 * MiB + 5] = 1;
    const zeroRanges = [
      { offset: 4096, length: 200 * MiB - 4096 },
      { offset: 200 * MiB + 8192, length: size - 200 * MiB - 8192 },
    ];
    const ep = new MemoryEndpoint(buf, 'm', zeroRanges);
    expect(await chunks(ep, { requestSize: 65536 })).toEqual([
      'data 0+65536',
      `zero 65536+${200 * MiB - 65536}`,
      `data ${200 * MiB}+65536`,
      `zero ${200 * MiB + 65536}+${100 * MiB - 65536}`,
    ]);
    expect(ep.log.filter((l) => l.startsWith('extents'))).toEqual([`extents 0+${size}`]);
    const dst = new MemoryEndpoint(Buffer.alloc(size), 'dst');
    await pipelinePromise(new ExtentSource(new MemoryEndpoint(buf, 'm', zeroRanges), { requestSize: 65536 }), new Sink(dst, { requestSize: 65536 }));
    expect(dst.log).toEqual([
      'write 0+65536',
      `zero 65536+${128 * MiB - 65536}`,
      `zero ${128 * MiB}+${72 * MiB}`,
      `write ${200 * MiB}+65536`,
      `zero ${200 * MiB + 65536}+${56 * MiB - 65536}`,
      `zero ${256 * MiB}+${44 * MiB}`,
    ]);
  });
  it('reads everything with extents off, consecutive pieces together up to the read size', async () => {
    const ep = new MemoryEndpoint(Buffer.alloc(3 * MiB + 1), 'm', [{ offset: 0, length: 3 * MiB + 1 }]);
    expect(await chunks(ep, { requestSize: 262144, extents: false, readSize: MiB })).toEqual(['data 0+1048576', 'data 1048576+1048576', 'data 2097152+1048576', 'data 3145728+1']);
    expect(ep.log).toEqual(['read 0+1048576', 'read 1048576+1048576', 'read 2097152+1048576', 'read 3145728+1']);
  });
  it('fails on a read error instead of producing zeroes', async () => {
    const ep = new MemoryEndpoint(Buffer.alloc(MiB), 'm');
    ep.read = async (offset) => {
      throw Object.assign(new Error('boom'), { offset });
    };
    await expect(chunks(ep)).rejects.toThrow('boom');
  });
});

describe('read buffers (BufferPool) and the --queue-size bound', () => {
  it('cuts short reads from shared slabs, reuses a slab once all its pieces are back, and counts slabs as pinned', () => {
    const K = 1024;
    const pool = new BufferPool(MiB);
    const a = pool.take(299 * K);
    const b = pool.take(300 * K);
    expect(a.buf.buffer).toBe(b.buf.buffer); // one slab
    expect(b.buf.byteOffset - a.buf.byteOffset).toBe(300 * K); // pieces start 4 KiB-aligned
    expect(pool.pinned).toBe(600 * K); // the part cut so far
    const c = pool.take(600 * K); // does not fit: the first slab is left whole, a second is cut
    expect(c.buf.buffer).not.toBe(a.buf.buffer);
    expect(pool.pinned).toBe(MiB + 600 * K);
    a.release();
    a.release(); // a second call is ignored
    expect(pool.pinned).toBe(MiB + 600 * K);
    b.release(); // the first slab is free again
    expect(pool.pinned).toBe(600 * K);
    const d = pool.take(MiB); // does not fit the second slab: the freed first one is reused
    expect(d.buf.buffer).toBe(a.buf.buffer);
    expect(pool.pinned).toBe(2 * MiB);
    c.release();
    d.release(); // the current slab, all back: cut from its start again
    expect(pool.pinned).toBe(0);
    expect(pool.take(K).buf.byteOffset).toBe(d.buf.byteOffset);
  });

  // many short data extents: every read is shorter than the largest read size
  const shortExtents = (size: number): MemoryEndpoint => {
    const buf = Buffer.alloc(size, 1);
    const zeroRanges = [];
    for (let o = 0; o < size; o += 512 * 1024) zeroRanges.push({ offset: o + 256 * 1024, length: 256 * 1024 });
    for (const z of zeroRanges) buf.fill(0, z.offset, z.offset + z.length);
    return new MemoryEndpoint(buf, 'memory:', zeroRanges);
  };

  it('keeps the buffers of a copy within queue-size however short its reads', async () => {
    const src = shortExtents(64 * MiB);
    const source = new ExtentSource(src, { queueSize: 4 * MiB });
    let heldMost = 0;
    let held = 0;
    const dst = new MemoryEndpoint(Buffer.alloc(src.size));
    const sink = new Sink(dst, { queueSize: 64 * MiB });
    // a slow target: each chunk's buffer comes back 2 ms after it arrived
    const watch = new Transform({
      transform(c: Chunk, cb) {
        if (c.kind === 'data') {
          held += c.length;
          heldMost = Math.max(heldMost, held);
          const release = c.release!;
          c.release = () =>
            setTimeout(() => {
              held -= c.length;
              release();
            }, 2);
        }
        cb(null, c);
      },
    });
    await pipelinePromise(source, watch, sink);
    expect(dst.buffer.equals(src.buffer)).toBe(true);
    // 128 reads of 256 KiB, cut from one 4 MiB slab: up to 16 at once, never more than the budget
    expect(heldMost).toBeLessThanOrEqual(4 * MiB);
    expect(heldMost).toBeGreaterThanOrEqual(2 * MiB);
  });

  it('still ends when the consumer never releases (one read per stall beyond the budget)', async () => {
    const src = shortExtents(12 * MiB);
    const chunks: Chunk[] = [];
    for await (const c of new ExtentSource(src, { queueSize: 4 * MiB })) chunks.push(c as Chunk);
    const data = chunks.filter((c) => c.kind === 'data');
    expect(data.reduce((n, c) => n + c.length, 0)).toBe(6 * MiB);
    expect(data.every((c) => c.data!.equals(src.buffer.subarray(c.offset, c.offset + c.length)))).toBe(true);
  });
});
