/**
 * blkhash (lib/blkhash.ts), compare (lib/compare.ts), progress (lib/progress.ts) through the
 * library: digests checked against python3's hashlib (test/helpers/blkhash.ts), for every
 * algorithm and several block sizes, on empty, 1-byte, unaligned, all-zero and holey images,
 * fed in chunks that do not line up with blocks. Issue 7.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  BlockHasher,
  BLKHASH_ALGORITHMS,
  MemoryEndpoint,
  NbdStreamError,
  blkhashBuffer,
  compareEndpoints,
  copy,
  copyProgress,
  hashEndpoint,
  parseBlkhash,
  throttle,
  type CopyProgress,
  type Endpoint,
  type ExtentRun,
  type Range,
} from '../../lib/index.js';
import { tmpDir } from '../helpers/servers.js';
import { pyBlkhash } from '../helpers/blkhash.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const dir = tmpDir('nbdstream-blkhash-');
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A seeded generator, so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
}

interface Image {
  name: string;
  data: Buffer;
  /** Ranges known to be zero (what an endpoint's extents would report). */
  holes: Range[];
}

/** Random data with zero holes at unaligned offsets (holes listed, and really zero). */
function holey(size: number, seed: number): Image {
  const r = rng(seed);
  const data = randomBytes(size);
  const holes: Range[] = [];
  for (let o = Math.floor(r() * 5000); o < size; ) {
    const len = Math.min(size - o, 1 + Math.floor(r() * 300 * KiB));
    data.fill(0, o, o + len);
    holes.push({ offset: o, length: len });
    o += len + 1 + Math.floor(r() * 200 * KiB);
  }
  return { name: `holey-${size}`, data, holes };
}

const IMAGES: Image[] = [
  { name: 'empty', data: Buffer.alloc(0), holes: [] },
  { name: '1 byte', data: Buffer.from([0x5a]), holes: [] },
  { name: '1 zero byte', data: Buffer.alloc(1), holes: [{ offset: 0, length: 1 }] },
  { name: 'unaligned random', data: randomBytes(3 * 64 * KiB + 12345), holes: [] },
  { name: 'all zero, unaligned', data: Buffer.alloc(MiB + 4097), holes: [{ offset: 0, length: MiB + 4097 }] },
  holey(2 * MiB + 777, 7),
];
const SPECS = BLKHASH_ALGORITHMS.flatMap((alg) => [`${alg}/512`, `${alg}/1000`, `${alg}/4096`, `${alg}/65536`, `${alg}/1048576`]);

const expected = new Map<string, Record<string, string>>();
function reference(img: Image): Record<string, string> {
  let r = expected.get(img.name);
  if (!r) {
    const file = path.join(dir, img.name.replace(/\W+/g, '_'));
    fs.writeFileSync(file, img.data);
    r = pyBlkhash(file, SPECS);
    expected.set(img.name, r);
  }
  return r;
}

/** Feed an image in random-sized pieces; zero ranges (and, sometimes, zero bytes) via zeroes(). */
function feed(h: BlockHasher, img: Image, seed: number): string {
  const r = rng(seed);
  const isHole = (o: number) => img.holes.find((z) => z.offset <= o && o < z.offset + z.length);
  for (let o = 0; o < img.data.length; ) {
    const hole = isHole(o);
    const limit = hole ? hole.offset + hole.length : (img.holes.find((z) => z.offset > o)?.offset ?? img.data.length);
    const len = Math.max(1, Math.min(limit - o, Math.floor(r() * 3 * h.blockSize) + 1));
    if (hole && r() < 0.8) h.zeroes(len);
    else h.update(img.data.subarray(o, o + len));
    o += len;
  }
  return h.digest();
}

describe('blkhash matches python hashlib', () => {
  for (const img of IMAGES) {
    it(`${img.name}: all algorithms and block sizes, whole buffer and random chunking`, () => {
      const want = reference(img);
      for (const spec of SPECS) {
        expect(blkhashBuffer(img.data, spec), spec).toBe(want[spec]);
        for (const seed of [1, 2, 3]) expect(feed(new BlockHasher(spec), img, seed), `${spec} seed ${seed}`).toBe(want[spec]);
      }
    });
  }

  it('the default is sha256 with 64 KiB blocks', () => {
    const img = IMAGES[3];
    const h = new BlockHasher();
    expect([h.algorithm, h.blockSize]).toEqual(['sha256', 65536]);
    expect(blkhashBuffer(img.data)).toBe(reference(img)['sha256/65536']);
  });

  it('hashEndpoint reads only data extents and gives the same digest', async () => {
    const img = IMAGES[5];
    const ep = new MemoryEndpoint(Buffer.from(img.data), 'memory:', img.holes);
    for (const spec of ['sha256/65536', 'md5/4096', 'sha512/1000']) {
      const [algorithm, bs] = spec.split('/');
      const r = await hashEndpoint(ep, { algorithm: algorithm as 'md5', blockSize: Number(bs), requestSize: 64 * KiB });
      expect(r.digest, spec).toBe(reference(img)[spec]);
    }
    // every read overlaps data: whole 64 KiB pieces inside a hole are never read
    for (const l of ep.log.filter((x) => x.startsWith('read '))) {
      const [o, n] = l.slice(5).split('+').map(Number);
      const inside = img.holes.some((z) => z.offset <= o && o + n <= z.offset + z.length);
      expect(inside, l).toBe(false);
    }
  });

  it('a 1 TiB hole costs no reads and little time', async () => {
    const TiB = 2 ** 40;
    let reads = 0;
    const ep: Endpoint = {
      name: 'hole:',
      size: TiB,
      capabilities: { canExtents: true, canZero: false, canFastZero: false, canTrim: false, canFlush: false, canMultiConn: false, preferredBlockSize: 4096, maxRequest: 32 * MiB, isZeroInitialised: false, seekable: true, readOnly: true },
      extents: async (offset: number, length: number): Promise<ExtentRun[]> => [{ offset, length, zero: true }],
      read: async () => {
        reads++;
        throw new Error('read');
      },
      write: async () => undefined,
      zero: async () => undefined,
      flush: async () => undefined,
      close: async () => undefined,
    };
    const t0 = Date.now();
    const r = await hashEndpoint(ep);
    const ms = Date.now() - t0;
    expect(reads).toBe(0);
    expect(ms).toBeLessThan(15_000);
    // python: 2^24 copies of H(64 KiB of zeroes), then le64(2^40)
    const py = execFileSync('python3', [
      '-c',
      `import hashlib, struct
z = hashlib.sha256(bytes(65536)).digest()
o = hashlib.sha256()
rep = z * 32768
for i in range(2**24 // 32768): o.update(rep)
o.update(struct.pack('<Q', 2**40))
print(o.hexdigest())`,
    ])
      .toString()
      .trim();
    expect(r.digest).toBe(py);
  });
});

describe('parseBlkhash', () => {
  it.each([
    ['', 'sha256', 65536],
    ['sha1', 'sha1', 65536],
    ['sha1/4k', 'sha1', 4096],
    ['md5/4096', 'md5', 4096],
    ['SHA512/1M', 'sha512', MiB],
    ['/1000', 'sha256', 1000],
  ])('%j', (text, algorithm, blockSize) => {
    expect(parseBlkhash(text)).toEqual({ algorithm, blockSize });
  });
  it.each(['crc32', 'sha1/', 'sha1/abc', 'sha256/1G', 'sha1/0', 'sha1:4k'])('rejects %j', (text) => {
    expect(() => parseBlkhash(text)).toThrow(NbdStreamError);
  });
});

/** A memory target that flips one bit at `at` whenever a write or zero covers it. */
class CorruptingTarget extends MemoryEndpoint {
  constructor(
    size: number,
    private readonly at: number,
  ) {
    super(Buffer.alloc(size), 'corrupting:');
  }
  override async write(offset: number, data: Buffer): Promise<void> {
    await super.write(offset, data);
    if (offset <= this.at && this.at < offset + data.length) await this.flip();
  }
  override async zero(offset: number, length: number): Promise<void> {
    await super.zero(offset, length);
    if (offset <= this.at && this.at < offset + length) await this.flip();
  }
  /** Stored as a write, so the extents no longer call that byte zero (as a real disk would). */
  private flip(): Promise<void> {
    return super.write(this.at, Buffer.from([this.buffer[this.at] ^ 1]));
  }
}

describe('copy() with blkhash and verify', () => {
  const img = IMAGES[5];
  // a sparse file: only the data ranges are written, so its holes are real (SEEK_HOLE) holes
  const srcFile = path.join(dir, 'copy-src.img');
  const fd = fs.openSync(srcFile, 'w');
  fs.ftruncateSync(fd, img.data.length);
  let pos = 0;
  for (const z of [...img.holes, { offset: img.data.length, length: 0 }]) {
    if (z.offset > pos) fs.writeSync(fd, img.data, pos, z.offset - pos, pos);
    pos = z.offset + z.length;
  }
  fs.closeSync(fd);
  const biggestHole = [...img.holes].sort((a, b) => b.length - a.length)[0];

  it('summary.blkhash is the source digest; verify passes on a good copy', async () => {
    const out = path.join(dir, 'copy-out.img');
    const s = await copy(srcFile, out, { blkhash: 'sha1/4k', verify: true });
    expect(s.blkhash).toEqual({ algorithm: 'sha1', blockSize: 4096, digest: reference(img)['sha1/4096'] });
    expect(s.verified).toBe(true);
    expect(fs.readFileSync(out).equals(img.data)).toBe(true);
    const d = await copy(srcFile, path.join(dir, 'copy-out2.img'), { blkhash: true });
    expect(d.blkhash?.digest).toBe(reference(img)['sha256/65536']);
    expect(d.verified).toBeUndefined();
    const v = await copy(srcFile, path.join(dir, 'copy-out3.img'), { verify: true });
    expect(v.blkhash?.digest).toBe(reference(img)['sha256/65536']);
  });

  // start, middle, end, and inside a hole (the target is not zero-initialised, so holes are zero requests)
  const hole = biggestHole;
  const cases: Array<[string, number]> = [
    ['start', 0],
    ['middle', Math.floor(img.data.length / 2)],
    ['end', img.data.length - 1],
    ['inside a hole', hole.offset + Math.floor(hole.length / 2)],
  ];
  it.each(cases)('verify catches a flipped bit at the %s', async (_name, at) => {
    const dst = new CorruptingTarget(img.data.length, at);
    const err = await copy(srcFile, dst, { verify: true, sparse: 4096 }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(NbdStreamError);
    const e = err as NbdStreamError;
    expect(e.code).toBe('ERR_VERIFY');
    expect(e.offset).toBe(at);
    expect(e.describe()).toBe(`corrupting:: offset ${at}: verify failed: the destination differs from the source`);
  });

  it('verify refuses a destination that cannot be read back, before copying', async () => {
    await expect(copy(srcFile, 'null:', { verify: true })).rejects.toThrow('verify: the destination null: cannot be read back');
  });

  it('onProgress: monotonic, phases copying → verifying → done, ends with bytes_done == bytes_total', async () => {
    const seen: CopyProgress[] = [];
    await copy(srcFile, path.join(dir, 'progress-out.img'), { verify: true, requestSize: 64 * KiB, onProgress: (_d, _t, p) => seen.push(p) });
    expect(seen.length).toBeGreaterThan(2);
    const order = ['copying', 'verifying', 'done'];
    for (let i = 1; i < seen.length; i++) {
      expect(seen[i].bytes_done).toBeGreaterThanOrEqual(seen[i - 1].bytes_done);
      expect(order.indexOf(seen[i].phase)).toBeGreaterThanOrEqual(order.indexOf(seen[i - 1].phase));
      expect(seen[i].bytes_verified!).toBeGreaterThanOrEqual(seen[i - 1].bytes_verified!);
    }
    expect(seen.map((p) => p.phase)).toContain('verifying');
    const last = seen[seen.length - 1];
    expect(last).toMatchObject({ phase: 'done', bytes_done: img.data.length, bytes_total: img.data.length, bytes_verified: img.data.length, eta_s: 0 });
  });

  it('copyProgress: an async iterator of reports, returning the summary', async () => {
    const it = copyProgress(srcFile, path.join(dir, 'iter-out.img'), { blkhash: 'md5', interval: 0 });
    const seen: CopyProgress[] = [];
    let r = await it.next();
    while (!r.done) {
      seen.push(r.value);
      r = await it.next();
    }
    expect(seen.at(-1)?.phase).toBe('done');
    expect(r.value.blkhash?.digest).toBe(reference(img)['md5/65536']);
  });

  it('copyProgress throws when the copy fails', async () => {
    const run = async () => {
      for await (const _ of copyProgress(path.join(dir, 'missing.img'), 'null:')) void _;
    };
    await expect(run()).rejects.toThrow(/cannot open/);
  });
});

describe('throttle', () => {
  it('passes the first value at once, then at most one per interval (the newest), and final() at once', async () => {
    const got: number[] = [];
    const t = throttle<number>((v) => got.push(v), 100);
    t.push(1);
    t.push(2);
    t.push(3);
    expect(got).toEqual([1]);
    await new Promise((r) => setTimeout(r, 150));
    expect(got).toEqual([1, 3]);
    t.push(4);
    t.final(5);
    expect(got).toEqual([1, 3, 5]);
    await new Promise((r) => setTimeout(r, 150));
    expect(got).toEqual([1, 3, 5]);
  });
});

describe('compareEndpoints', () => {
  const img = IMAGES[5];
  const mem = (data: Buffer, holes = img.holes) => new MemoryEndpoint(Buffer.from(data), 'memory:', holes);
  const reads = (ep: MemoryEndpoint) => ep.log.filter((l) => l.startsWith('read ')).map((l) => l.slice(5).split('+').map(Number));

  it('identical images; ranges that both report as zero are not read', async () => {
    const a = mem(img.data);
    const b = mem(img.data);
    const r = await compareEndpoints(a, b, { requestSize: 64 * KiB });
    expect(r).toMatchObject({ identical: true, sizeMismatch: false });
    for (const ep of [a, b])
      for (const [o, n] of reads(ep)) expect(img.holes.some((z) => z.offset <= o && o + n <= z.offset + z.length), `read ${o}+${n}`).toBe(false);
  });

  const hole = img.holes[2];
  it.each([
    ['start', 0],
    ['middle', Math.floor(img.data.length / 2) + 3],
    ['end', img.data.length - 1],
    ['inside a hole', hole.offset + 1234],
  ])('a flipped byte at the %s is found at its exact offset, either way round', async (_n, at) => {
    const other = Buffer.from(img.data);
    other[at] ^= 0x80;
    // b keeps the holes of a except where the flipped byte is
    const holes = img.holes.flatMap((z) =>
      z.offset <= at && at < z.offset + z.length
        ? [
            { offset: z.offset, length: at - z.offset },
            { offset: at + 1, length: z.offset + z.length - at - 1 },
          ].filter((x) => x.length > 0)
        : [z],
    );
    expect(await compareEndpoints(mem(img.data), mem(other, holes))).toMatchObject({ identical: false, difference: 'content', offset: at });
    expect(await compareEndpoints(mem(other, holes), mem(img.data))).toMatchObject({ identical: false, difference: 'content', offset: at });
  });

  it('different sizes: the extra part must be zero; strict makes any size difference a difference', async () => {
    const a = mem(img.data);
    const longer = Buffer.concat([img.data, Buffer.alloc(100 * KiB)]);
    expect(await compareEndpoints(a, mem(longer, [...img.holes, { offset: img.data.length, length: 100 * KiB }]))).toMatchObject({ identical: true, sizeMismatch: true });
    expect(await compareEndpoints(mem(longer, []), a)).toMatchObject({ identical: true, sizeMismatch: true });
    longer[img.data.length + 5000] = 1;
    expect(await compareEndpoints(a, mem(longer, []))).toMatchObject({ identical: false, difference: 'content', offset: img.data.length + 5000 });
    expect(await compareEndpoints(a, mem(longer, []), { strict: true })).toMatchObject({ identical: false, difference: 'size' });
  });
});
