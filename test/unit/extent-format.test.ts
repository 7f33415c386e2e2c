/**
 * The extent stream format (lib/streams/extent-codec.ts, extent-format.ts): round trips with the
 * input split at every byte boundary, every integrity rule, truncation at every byte, the worked
 * hex example of docs/extent-stream.md, fuzzing with fast-check, and the Transforms between
 * ExtentSource and Sink. Issue 8.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pipelinePromise, Readable, Writable } from 'streamx';
import {
  ExtentFrameDecoder,
  ExtentFrameEncoder,
  HEADER_SIZE,
  MAX_DATA_RECORD,
  RECORD_HEADER_SIZE,
  TYPE_DATA,
  TYPE_ZERO,
  crc32,
  decodeExtentStream,
  encodeExtentStream,
  encodeHeader,
  encodeRecordHeader,
} from '../../lib/streams/extent-codec.js';
import { ExtentDecoder, ExtentEncoder } from '../../lib/streams/extent-format.js';
import { ExtentSource } from '../../lib/streams/extent-source.js';
import { ZeroDetect } from '../../lib/streams/zero-detect.js';
import { Sink } from '../../lib/streams/sink.js';
import { MemoryEndpoint } from '../../lib/endpoints/memory.js';
import { blkhashBuffer } from '../../lib/blkhash.js';
import { NbdStreamError } from '../../lib/errors.js';
import type { Chunk } from '../../lib/extents.js';

const ROOT = path.resolve(__dirname, '../..');

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

/** An image and the chunks describing it (data runs hold the image's bytes, zero runs are zero). */
function image(size: number, seed: number, maxRun = 300): { data: Buffer; chunks: Chunk[] } {
  const r = rng(seed);
  const data = Buffer.alloc(size);
  const chunks: Chunk[] = [];
  for (let o = 0; o < size; ) {
    const len = Math.min(size - o, 1 + Math.floor(r() * maxRun));
    if (r() < 0.5) {
      for (let i = 0; i < len; i++) data[o + i] = Math.floor(r() * 256);
      chunks.push({ offset: o, length: len, kind: 'data', data: data.subarray(o, o + len) });
    } else chunks.push({ offset: o, length: len, kind: 'zero' });
    o += len;
  }
  return { data, chunks };
}

/** Rebuild an image from decoded chunks (gaps stay as `base`). */
function apply(size: number, chunks: Chunk[], base?: Buffer): Buffer {
  const out = base ? Buffer.from(base) : Buffer.alloc(size, 0xaa);
  for (const c of chunks) {
    if (c.kind === 'data') c.data!.copy(out, c.offset);
    else out.fill(0, c.offset, c.offset + c.length);
  }
  return out;
}

/** Decode `stream` fed in the given pieces; returns chunks (data copied) or the error. */
function decodeSplit(stream: Buffer, cuts: number[]): { chunks: Chunk[]; error?: NbdStreamError; size?: number } {
  const d = new ExtentFrameDecoder();
  const chunks: Chunk[] = [];
  let prev = 0;
  try {
    for (const cut of [...cuts, stream.length]) {
      for (const c of d.push(stream.subarray(prev, cut))) chunks.push(c.kind === 'data' ? { ...c, data: Buffer.from(c.data!) } : c);
      prev = cut;
    }
    const r = d.end();
    return { chunks, size: r.size };
  } catch (err) {
    return { chunks, error: err as NbdStreamError };
  }
}

function expectProtocolError(stream: Buffer, re: RegExp, offset?: number): NbdStreamError {
  const r = decodeSplit(stream, []);
  expect(r.error, `expected ${re}`).toBeInstanceOf(NbdStreamError);
  expect(r.error!.code).toBe('ERR_PROTOCOL');
  expect(r.error!.message).toMatch(re);
  expect(r.error!.message).toMatch(/\(stream byte \d+\)$/);
  if (offset !== undefined) expect(r.error!.offset).toBe(offset);
  return r.error!;
}

/** A valid stream with the given records after the header (no END unless given). */
function raw(header: Buffer, ...records: Buffer[]): Buffer {
  return Buffer.concat([header, ...records]);
}

describe('extent stream framing', () => {
  it('round-trips small images with the input split at every byte boundary', () => {
    for (const seed of [1, 2, 3, 4, 5]) {
      const size = 200 + seed * 97;
      const img = image(size, seed, 60);
      const stream = encodeExtentStream(img.chunks, { size, blkhash: 'sha256/64' });
      for (let cut = 0; cut <= stream.length; cut++) {
        const r = decodeSplit(stream, [cut]);
        expect(r.error, `seed ${seed} cut ${cut}`).toBeUndefined();
        expect(r.size).toBe(size);
        expect(apply(size, r.chunks).equals(img.data)).toBe(true);
      }
      // and one byte at a time
      const r = decodeSplit(stream, Array.from({ length: stream.length - 1 }, (_, i) => i + 1));
      expect(r.error).toBeUndefined();
      expect(apply(size, r.chunks).equals(img.data)).toBe(true);
    }
  });

  it('merges adjacent zero ranges, fills gaps with ZERO, cuts DATA at the record limit', () => {
    const enc = new ExtentFrameEncoder({ size: 100, blkhash: false });
    const parts = [
      ...enc.start(),
      ...enc.zero(0, 10),
      ...enc.zero(10, 10),
      ...enc.data(30, Buffer.alloc(5, 1)), // gap 20..30 becomes zero, merged with 0..20
      ...enc.end(), // 35..100 zero
    ];
    const { chunks, result } = decodeExtentStream(Buffer.concat(parts));
    expect(chunks.map((c) => `${c.kind} ${c.offset}+${c.length}`)).toEqual(['zero 0+30', 'data 30+5', 'zero 35+65']);
    expect(result).toEqual({ size: 100, blkhash: undefined });
    expect(enc.records).toEqual({ data: 1, zero: 2 });

    const big = Buffer.alloc(MAX_DATA_RECORD + 10, 7);
    const e2 = new ExtentFrameEncoder({ blkhash: false });
    const s2 = Buffer.concat([...e2.start(), ...e2.data(0, big), ...e2.end()]);
    const d2 = decodeExtentStream(s2);
    expect(d2.chunks.map((c) => c.length)).toEqual([MAX_DATA_RECORD, 10]);
    expect(d2.header.size).toBeUndefined();
    expect(d2.result.size).toBe(big.length);
  });

  it('the END digest is the blkhash of the image (as --blkhash prints it)', () => {
    const img = image(100_000, 9, 5000);
    for (const spec of ['sha256/64k', 'md5/4k', 'sha1/512', 'sha512/1k']) {
      const s = encodeExtentStream(img.chunks, { size: img.data.length, blkhash: spec });
      expect(decodeExtentStream(s).result.blkhash?.digest).toBe(blkhashBuffer(img.data, spec));
    }
  });

  it('incremental streams keep their gaps: no chunks there, hashed as zeroes', () => {
    const size = 1000;
    const data = Buffer.alloc(size);
    data.fill(5, 100, 200);
    const chunks: Chunk[] = [
      { offset: 100, length: 100, kind: 'data', data: data.subarray(100, 200) },
      { offset: 500, length: 50, kind: 'zero' },
    ];
    const s = encodeExtentStream(chunks, { size, incremental: true });
    const d = decodeExtentStream(s);
    expect(d.header.incremental).toBe(true);
    expect(d.chunks.map((c) => `${c.kind} ${c.offset}+${c.length}`)).toEqual(['data 100+100', 'zero 500+50']);
    expect(d.result.blkhash?.digest).toBe(blkhashBuffer(data));
    // an incremental stream must name its size
    expect(() => encodeHeader({ incremental: true })).toThrow(/needs the image size/);
  });

  it('an empty image is a header and an END record', () => {
    const s = encodeExtentStream([], { size: 0 });
    expect(s.length).toBe(HEADER_SIZE + RECORD_HEADER_SIZE + 8 + 32);
    expect(decodeExtentStream(s).result.size).toBe(0);
  });
});

describe('extent stream integrity', () => {
  const H = () => encodeHeader({ size: 4096, blkhash: false });
  const data = (o: number, n: number) => Buffer.concat([encodeRecordHeader(TYPE_DATA, o, n), Buffer.alloc(n, 1)]);
  const zero = (o: number, n: number) => encodeRecordHeader(TYPE_ZERO, o, n);
  const valid = () => encodeExtentStream([{ offset: 0, length: 10, kind: 'data', data: Buffer.alloc(10, 3) }, { offset: 10, length: 4086, kind: 'zero' }], { size: 4096 });

  it('rejects a bad header: magic, version, length, checksum, flags, hash', () => {
    const h = H();
    expectProtocolError(Buffer.from('hello world, this is a raw image...............'), /bad magic 68656c6c6f20776f \(not an extent stream\)/);
    const v = Buffer.from(h);
    v.writeUInt16BE(2, 8);
    expectProtocolError(v, /unsupported version 2/);
    const l = Buffer.from(h);
    l.writeUInt16BE(12, 10);
    expectProtocolError(l, /bad header length 12/);
    const c = Buffer.from(h);
    c[17] ^= 1; // size changed, checksum not
    expectProtocolError(c, /header checksum mismatch/);
    const reseal = (b: Buffer) => (b.writeUInt32BE(crc32(b.subarray(0, 32)), 32), b);
    const f = Buffer.from(h);
    f.writeUInt32BE(0x11, 12);
    expectProtocolError(reseal(f), /unknown header flags 0x10/);
    const a = Buffer.from(h);
    a[24] = 9;
    a.writeUInt32BE(4096, 28);
    expectProtocolError(reseal(a), /unknown hash algorithm 9/);
    const i = Buffer.from(h);
    i.writeUInt32BE(2, 12); // incremental without size
    i.fill(0, 16, 24);
    expectProtocolError(reseal(i), /INCREMENTAL stream without an image size/);
  });

  it('rejects bad records: checksum, type, lengths, overlap, gap, past the end', () => {
    const h = H();
    const bad = zero(0, 4096);
    bad[15] ^= 4;
    expectProtocolError(raw(h, bad), /record header checksum mismatch after image offset 0/, 0);
    const t = encodeRecordHeader(0x54524d21, 0, 10);
    expectProtocolError(raw(h, t), /unknown record type "TRM!" after image offset 0/);
    expectProtocolError(raw(h, zero(0, 0)), /ZERO record at offset 0 has length 0/, 0);
    expectProtocolError(raw(encodeHeader({ blkhash: false }), encodeRecordHeader(TYPE_DATA, 0, MAX_DATA_RECORD + 1)), /DATA record at offset 0 has length 33554433, more than/);
    expectProtocolError(raw(h, data(0, 100), data(50, 100)), /DATA record at offset 50 overlaps the previous record, which ends at 100/, 50);
    expectProtocolError(raw(h, data(0, 100), zero(200, 100)), /gap: ZERO record at offset 200, but the previous record ends at 100/, 200);
    expectProtocolError(raw(h, zero(0, 4000), data(4000, 100)), /DATA record 4000\+100 ends past the image size 4096/, 4000);
    const huge = encodeRecordHeader(TYPE_ZERO, 0, 0);
    huge.writeUInt32BE(0xffffffff, 12);
    huge.writeUInt32BE(crc32(huge.subarray(0, 20)), 20);
    expectProtocolError(raw(encodeHeader({ blkhash: false }), huge), /beyond 2\^53 - 1/);
  });

  it('rejects a wrong END: length, total, digest; and bytes after it', () => {
    const s = valid();
    const endAt = s.length - (RECORD_HEADER_SIZE + 8 + 32);
    // END claiming more than the records cover
    const e = Buffer.from(s);
    e.writeUInt32BE(5000, endAt + 8);
    e.writeUInt32BE(crc32(e.subarray(endAt, endAt + 20)), endAt + 20);
    expectProtocolError(e, /END says the image is 5000 bytes, but the records end at 4096 \(records missing\)/, 5000);
    // a payload byte changed: only the digest can tell
    const p = Buffer.from(s);
    p[HEADER_SIZE + RECORD_HEADER_SIZE + 3] ^= 0x40;
    expectProtocolError(p, /blkhash mismatch: END says sha256 [0-9a-f]{64}, the records hash to [0-9a-f]{64}/, 4096);
    // digest changed
    const d = Buffer.from(s);
    d[d.length - 1] ^= 1;
    expectProtocolError(d, /blkhash mismatch/);
    expectProtocolError(Buffer.concat([s, Buffer.from([0])]), /1 bytes after the END record/, 4096);
    const noHash = encodeExtentStream([], { size: 0, blkhash: false });
    const l = Buffer.from(noHash);
    l.writeUInt32BE(9, HEADER_SIZE + 16);
    l.writeUInt32BE(crc32(l.subarray(HEADER_SIZE, HEADER_SIZE + 20)), HEADER_SIZE + 20);
    expectProtocolError(l, /END record has a trailer of 9 bytes, expected 8/);
  });

  it('never succeeds on a truncated stream: every proper prefix fails at the end', () => {
    const img = image(3000, 11, 400);
    const s = encodeExtentStream(img.chunks, { size: 3000 });
    for (let n = 0; n < s.length; n++) {
      const r = decodeSplit(s.subarray(0, n), n > 5 ? [5] : []);
      expect(r.error, `prefix ${n}`).toBeInstanceOf(NbdStreamError);
      expect(r.error!.code).toBe('ERR_PROTOCOL');
      expect(r.error!.message).toMatch(n === 0 ? /truncated: the stream is empty without an END record/ : /truncated: .* without an END record/);
    }
    expect(decodeSplit(s, []).error).toBeUndefined();
  });

  it('stays failed after an error', () => {
    const d = new ExtentFrameDecoder();
    expect(() => d.push(Buffer.from('raw'))).toThrow(/bad magic/);
    expect(() => d.push(encodeHeader())).toThrow(/bad magic/);
    expect(() => d.end()).toThrow(/bad magic/);
  });
});

describe('extent stream fuzzing', () => {
  const base = image(2000, 21, 300);
  const good = encodeExtentStream(base.chunks, { size: 2000 });

  it('mutated streams either fail with ERR_PROTOCOL or decode to the original image', () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.record({
            op: fc.constantFrom('set', 'flip', 'insert', 'delete', 'truncate'),
            at: fc.nat(),
            value: fc.integer({ min: 0, max: 255 }),
          }),
          { minLength: 1, maxLength: 4 },
        ),
        fc.array(fc.nat(), { maxLength: 3 }),
        (ops, cuts) => {
          let s = Buffer.from(good);
          for (const m of ops) {
            const at = s.length ? m.at % s.length : 0;
            if (m.op === 'set') s[at] = m.value;
            else if (m.op === 'flip') s[at] ^= 1 << (m.value % 8);
            else if (m.op === 'insert') s = Buffer.concat([s.subarray(0, at), Buffer.from([m.value]), s.subarray(at)]);
            else if (m.op === 'delete') s = Buffer.concat([s.subarray(0, at), s.subarray(at + 1)]);
            else s = s.subarray(0, at);
          }
          const sorted = cuts.map((c) => (s.length ? c % s.length : 0)).sort((a, b) => a - b);
          const r = decodeSplit(s, sorted);
          if (r.error) {
            expect(r.error).toBeInstanceOf(NbdStreamError);
            expect(r.error.code).toBe('ERR_PROTOCOL');
          } else {
            expect(s.equals(good) || apply(2000, r.chunks).equals(base.data)).toBe(true);
          }
        },
      ),
      { numRuns: 3000 },
    );
  });

  it('random images round-trip through random splits', () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ zero: fc.boolean(), length: fc.integer({ min: 1, max: 700 }), fill: fc.integer({ min: 0, max: 255 }) }), { maxLength: 12 }),
        fc.boolean(),
        fc.array(fc.nat(), { maxLength: 6 }),
        (runs, sizeKnown, cuts) => {
          const size = runs.reduce((a, r) => a + r.length, 0);
          const img = Buffer.alloc(size);
          const chunks: Chunk[] = [];
          let o = 0;
          for (const r of runs) {
            if (r.zero) chunks.push({ offset: o, length: r.length, kind: 'zero' });
            else {
              img.fill(r.fill, o, o + r.length);
              chunks.push({ offset: o, length: r.length, kind: 'data', data: img.subarray(o, o + r.length) });
            }
            o += r.length;
          }
          const s = encodeExtentStream(chunks, { size: sizeKnown ? size : undefined, blkhash: 'md5/256' });
          const sorted = cuts.map((c) => c % (s.length + 1)).sort((a, b) => a - b);
          const r = decodeSplit(s, sorted);
          expect(r.error).toBeUndefined();
          expect(r.size).toBe(size);
          expect(apply(size, r.chunks).equals(img)).toBe(true);
        },
      ),
      { numRuns: 2000 },
    );
  });
});

/** xxd-style lines: "00000000: 894e 4244 ...  ascii". */
function hexdump(b: Buffer): string {
  const lines: string[] = [];
  for (let o = 0; o < b.length; o += 16) {
    const row = b.subarray(o, o + 16);
    const hex = (row.toString('hex').match(/.{1,4}/g) ?? []).join(' ');
    const ascii = [...row].map((x) => (x >= 0x20 && x < 0x7f ? String.fromCharCode(x) : '.')).join('');
    lines.push(`${o.toString(16).padStart(8, '0')}: ${hex.padEnd(39)}  ${ascii}`);
  }
  return lines.join('\n');
}

describe('docs/extent-stream.md', () => {
  it('the worked example is what the encoder writes, and decodes back', () => {
    // 8 KiB image: "hello, world\n" at 4096, the rest zero; sha256 blkhash with 4 KiB blocks
    const img = Buffer.alloc(8192);
    img.write('hello, world\n', 4096);
    const chunks: Chunk[] = [
      { offset: 0, length: 4096, kind: 'zero' },
      { offset: 4096, length: 13, kind: 'data', data: img.subarray(4096, 4109) },
      { offset: 4109, length: 8192 - 4109, kind: 'zero' },
    ];
    const s = encodeExtentStream(chunks, { size: 8192, blkhash: 'sha256/4k' });
    const doc = fs.readFileSync(path.join(ROOT, 'docs/extent-stream.md'), 'utf8');
    const m = /<!-- example:begin -->\n```\n([\s\S]*?)\n```\n<!-- example:end -->/.exec(doc);
    expect(m, 'example block in docs/extent-stream.md').not.toBeNull();
    expect(m![1]).toBe(hexdump(s));
    const d = decodeExtentStream(s);
    expect(apply(8192, d.chunks, Buffer.alloc(8192)).equals(img)).toBe(true);
    expect(d.result.blkhash?.digest).toBe(blkhashBuffer(img, 'sha256/4k'));
    expect(doc).toContain(blkhashBuffer(img, 'sha256/4k'));
  });
});

/** A Readable of buffers cut into pieces of `size` bytes. */
function bytesOf(b: Buffer, size: number): Readable {
  const parts: Buffer[] = [];
  for (let o = 0; o < b.length; o += size) parts.push(b.subarray(o, o + size));
  return Readable.from(parts);
}

function collect(): { stream: Writable; bytes: () => Buffer } {
  const parts: Buffer[] = [];
  const stream = new Writable({
    write(data: unknown, cb: (err: Error | null) => void) {
      parts.push(Buffer.from(data as Buffer));
      cb(null);
    },
  });
  return { stream, bytes: () => Buffer.concat(parts) };
}

describe('ExtentEncoder / ExtentDecoder streams', () => {
  const MiB = 1 << 20;
  function sourceImage(): { src: MemoryEndpoint; data: Buffer } {
    const data = Buffer.alloc(8 * MiB);
    const r = rng(5);
    for (const at of [0, 3 * MiB + 4096, 5 * MiB - 100]) for (let i = 0; i < 300_000; i++) data[at + i] = 1 + Math.floor(r() * 255);
    data.fill(0, 3 * MiB + 4096 + 65536, 3 * MiB + 4096 + 2 * 65536); // zero blocks inside data
    const zeros = [
      { offset: 300_000, length: 3 * MiB + 4096 - 300_000 },
      { offset: 3 * MiB + 4096 + 300_000, length: 5 * MiB - 100 - (3 * MiB + 4096 + 300_000) },
      { offset: 5 * MiB + 300_000, length: 3 * MiB - 300_000 },
    ];
    return { src: new MemoryEndpoint(data, 'src', zeros), data };
  }

  it('ExtentSource → ZeroDetect → ExtentEncoder → bytes → ExtentDecoder → Sink copies the image, releasing every buffer', async () => {
    const { src, data } = sourceImage();
    const source = new ExtentSource(src);
    let outstanding = 0;
    // count releases: wrap every data chunk's release
    const counting = new (class extends ZeroDetect {
      override _transform(c: unknown, cb: (err: Error | null, data?: unknown) => void): void {
        const ch = c as Chunk;
        if (ch.release) {
          outstanding++;
          const r = ch.release;
          ch.release = () => (outstanding--, r());
        }
        super._transform(ch, cb);
      }
    })(4096);
    const enc = new ExtentEncoder({ size: src.size });
    const out = collect();
    await pipelinePromise(source, counting, enc, out.stream);
    expect(outstanding).toBe(0);
    const stream = out.bytes();
    expect(stream.length).toBe(enc.bytes);
    // far fewer bytes than the image: only data (minus the zero blocks -S found) and framing
    expect(stream.length).toBeLessThan(3 * 300_000 + 4096);
    expect(enc.frames.records.data).toBeGreaterThan(0);

    // through streams in pieces of 3 bytes and up (the framing tests split at every byte)
    for (const piece of [3, 7, 4096, 65536]) {
      const dst = new MemoryEndpoint(Buffer.alloc(8 * MiB, 0xee), 'dst');
      const dec = new ExtentDecoder();
      await pipelinePromise(bytesOf(stream, piece), dec, new ZeroDetect(4096), new Sink(dst));
      expect(dst.buffer.equals(data)).toBe(true);
      expect(dec.header?.size).toBe(8 * MiB);
      expect(dec.result?.blkhash?.digest).toBe(blkhashBuffer(data));
      // zeroes arrive as zero requests, never as written zero pages
      expect(dst.log.some((l) => l.startsWith('zero '))).toBe(true);
    }
  });

  it('the decoder fails the pipeline on a truncated stream, naming the offset', async () => {
    const { src } = sourceImage();
    const out = collect();
    await pipelinePromise(new ExtentSource(src), new ExtentEncoder({ size: src.size }), out.stream);
    const stream = out.bytes();
    for (const n of [0, 10, HEADER_SIZE, HEADER_SIZE + 30, Math.floor(stream.length / 2), stream.length - 1]) {
      const dst = new MemoryEndpoint(Buffer.alloc(8 * MiB), 'dst');
      const err = await pipelinePromise(bytesOf(stream.subarray(0, n), 65536), new ExtentDecoder(), new Sink(dst)).then(
        () => undefined,
        (e: unknown) => e as NbdStreamError,
      );
      expect(err, `prefix ${n}`).toBeInstanceOf(NbdStreamError);
      expect(err!.code).toBe('ERR_PROTOCOL');
      expect(err!.message).toMatch(/truncated/);
      if (n > HEADER_SIZE) expect(err!.offset).toBeTypeOf('number');
    }
  });

  it('the encoder passes release-less payloads on without copying', async () => {
    const payload = Buffer.alloc(65536, 9);
    const enc = new ExtentEncoder({ size: 65536, blkhash: false });
    const seen: Buffer[] = [];
    const sink = new Writable({
      write(d: unknown, cb: (err: Error | null) => void) {
        seen.push(d as Buffer);
        cb(null);
      },
    });
    await pipelinePromise(Readable.from([{ offset: 0, length: 65536, kind: 'data', data: payload } as Chunk]), enc, sink);
    expect(seen.some((b) => b === payload)).toBe(true);
    expect(decodeExtentStream(Buffer.concat(seen)).chunks[0].data!.equals(payload)).toBe(true);
  });
});
