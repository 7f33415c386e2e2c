/**
 * Partial sources (--dirty-bitmap): combining qemu:dirty-bitmap with base:allocation, and
 * ExtentSource leaving `skip` runs out of the copy — pieces cut at their edges, no chunk and no
 * request inside them, the target untouched there. Issue 8.
 */
import { describe, expect, it } from 'vitest';
import { pipelinePromise } from 'streamx';
import { combineDirty } from '../../lib/endpoints/nbd.js';
import { MemoryEndpoint } from '../../lib/endpoints/memory.js';
import type { ExtentRun } from '../../lib/endpoints/endpoint.js';
import { ExtentSource } from '../../lib/streams/extent-source.js';
import { ZeroDetect } from '../../lib/streams/zero-detect.js';
import { Sink } from '../../lib/streams/sink.js';
import { clipExtents } from '../../lib/extents.js';
import type { Chunk } from '../../lib/extents.js';

const KiB = 1024;
const MiB = 1024 * 1024;

describe('combineDirty', () => {
  it('clean ranges skip; dirty ranges are zero or data by base:allocation; covers as far as both answers', () => {
    const dirty = [
      { offset: 0, length: 64 * KiB, flags: 0 },
      { offset: 64 * KiB, length: 192 * KiB, flags: 1 },
      { offset: 256 * KiB, length: 1 * MiB, flags: 0 },
    ];
    const alloc = [
      { offset: 0, length: 128 * KiB, flags: 0 },
      { offset: 128 * KiB, length: 64 * KiB, flags: 3 },
      { offset: 192 * KiB, length: 512 * KiB, flags: 0 },
    ];
    expect(combineDirty(dirty, alloc)).toEqual([
      { offset: 0, length: 64 * KiB, zero: false, skip: true },
      { offset: 64 * KiB, length: 64 * KiB, zero: false },
      { offset: 128 * KiB, length: 64 * KiB, zero: true },
      { offset: 192 * KiB, length: 64 * KiB, zero: false },
      { offset: 256 * KiB, length: 448 * KiB, zero: false, skip: true },
    ]);
  });

  it('clipExtents keeps skip runs apart from data runs', () => {
    const runs: ExtentRun[] = [
      { offset: 0, length: 10, zero: false },
      { offset: 10, length: 10, zero: false, skip: true },
      { offset: 20, length: 10, zero: false, skip: true },
    ];
    expect(clipExtents(runs, 5, 20)).toEqual([
      { offset: 5, length: 5, zero: false },
      { offset: 10, length: 15, zero: false, skip: true },
    ]);
  });
});

/** A memory image whose extents() also reports ranges to skip. */
class PartialEndpoint extends MemoryEndpoint {
  constructor(
    buf: Buffer,
    zeroes: Array<{ offset: number; length: number }>,
    private readonly clean: Array<{ offset: number; length: number }>,
  ) {
    super(buf, 'partial', zeroes, { partial: true });
  }
  override async extents(offset: number, length: number): Promise<ExtentRun[]> {
    const base = await super.extents(offset, length);
    const out: ExtentRun[] = [];
    for (const r of base) {
      // cut each run at the clean ranges
      let pos = r.offset;
      const end = r.offset + r.length;
      const cuts = this.clean
        .flatMap((c) => [c.offset, c.offset + c.length])
        .filter((x) => x > pos && x < end)
        .sort((a, b) => a - b);
      for (const e of [...cuts, end]) {
        const skip = this.clean.some((c) => pos >= c.offset && pos < c.offset + c.length);
        out.push(skip ? { offset: pos, length: e - pos, zero: false, skip: true } : { offset: pos, length: e - pos, zero: r.zero });
        pos = e;
      }
    }
    return out;
  }
}

describe('ExtentSource with skip runs', () => {
  const merged = [
    'data 0K+100K', // the first piece ends where the clean range starts
    'data 300K+724K', // resumes at 300K; 300K-512K, then whole pieces up to the zero run
    'zero 1024K+512K', // the zero run ends at the clean range
    'zero 1792K+256K', // and resumes after it
    'data 2048K+1024K',
  ];
  // reads capped at the request size: the piece cut short at 300K is read alone, not with the next
  const capped = ['data 0K+100K', 'data 300K+212K', 'data 512K+256K', 'data 768K+256K', 'zero 1024K+512K', 'zero 1792K+256K'].concat(
    [2048, 2304, 2560, 2816].map((k) => `data ${k}K+256K`),
  );
  it.each([
    { readSize: 4 * MiB, want: merged },
    { readSize: undefined, want: capped },
  ])('emits nothing inside clean ranges, cuts pieces at their edges, and the sink leaves them alone (readSize $readSize)', async ({ readSize, want }) => {
    const size = 4 * MiB;
    const src = Buffer.alloc(size);
    for (let i = 0; i < size; i += 512) src[i] = 1 + ((i / 512) % 250);
    const zeroes = [{ offset: 1 * MiB, length: 1 * MiB }];
    src.fill(0, 1 * MiB, 2 * MiB);
    // clean: 100K-300K (unaligned both ends), 1.5M-1.75M (inside the zero run), 3M-end
    const clean = [
      { offset: 100 * KiB, length: 200 * KiB },
      { offset: 1536 * KiB, length: 256 * KiB },
      { offset: 3 * MiB, length: 1 * MiB },
    ];
    const ep = new PartialEndpoint(src, zeroes, clean);
    const chunks: Chunk[] = [];
    const source = new ExtentSource(ep, { requestSize: 256 * KiB, readSize });
    source.on('data', (c: Chunk) => chunks.push({ offset: c.offset, length: c.length, kind: c.kind }));
    const dst = new MemoryEndpoint(Buffer.alloc(size, 0xee), 'dst');
    // tee the chunks to the sink through ZeroDetect (0: off, so the chunks are what the source emitted)
    await pipelinePromise(source, new ZeroDetect(0), new Sink(dst, { requestSize: 256 * KiB }));

    const inClean = (o: number, n: number) => clean.some((c) => o < c.offset + c.length && o + n > c.offset);
    expect(chunks.every((c) => !inClean(c.offset, c.length))).toBe(true);
    expect(chunks.map((c) => `${c.kind} ${c.offset / KiB}K+${c.length / KiB}K`)).toEqual(want);
    // what was copied is the source; what was skipped is as it was
    for (let o = 0; o < size; o += 4 * KiB) {
      const want = inClean(o, 4 * KiB) ? Buffer.alloc(4 * KiB, 0xee) : src.subarray(o, o + 4 * KiB);
      expect(dst.buffer.subarray(o, o + 4 * KiB).equals(want), `at ${o}`).toBe(true);
    }
    expect(dst.log.some((l) => /^(write|zero) /.test(l) && inClean(Number(l.split(' ')[1].split('+')[0]), Number(l.split('+')[1])))).toBe(false);
  });
});
