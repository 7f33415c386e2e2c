/**
 * Property-based fuzzing of the reply decoder and the client handshake with generated malformed
 * input: never a throw, never a hang, a coded error (ERR_PROTOCOL / ERR_HANDSHAKE / ...) each time
 * the input is bad. More than 100k inputs per run.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { ReplyDecoder, type Extent, type PendingRequest, type ReplyHandler } from '../../lib/nbd/decode.js';
import { clientHandshake } from '../../lib/nbd/handshake.js';
import { encodeBlockStatusExt, encodeErrorChunk, encodeNoneChunk, encodeOffsetDataHeader, encodeOffsetHole, toExtendedChunk } from '../../lib/nbd/server-codec.js';
import { NbdStreamError } from '../../lib/errors.js';
import * as P from '../../lib/nbd/protocol.js';

const CODES = new Set(['ERR_PROTOCOL', 'ERR_HANDSHAKE', 'ERR_TLS', 'ERR_CLOSED']);

// ------------------------------------------------------------------ reply decoder

function requests(): Map<number, PendingRequest> {
  return new Map<number, PendingRequest>([
    [1, { type: P.NBD_CMD_READ, offset: 4096, length: 64, dest: Buffer.alloc(64) }],
    [2, { type: P.NBD_CMD_WRITE, offset: 0, length: 4 }],
    [3, { type: P.NBD_CMD_BLOCK_STATUS, offset: 0, length: 1 << 20 }],
    [4, { type: P.NBD_CMD_READ, offset: 0, length: 16, dest: Buffer.alloc(16) }],
  ]);
}

class Counting implements ReplyHandler {
  events = 0;
  errors: NbdStreamError[] = [];
  reqs = requests();
  lookup(c: number) {
    return this.reqs.get(c);
  }
  onSimpleReply() {
    this.events++;
  }
  onData() {
    this.events++;
  }
  onHole() {
    this.events++;
  }
  onBlockStatus(_c: number, _id: number, _e: Extent[]) {
    this.events++;
  }
  onError() {
    this.events++;
  }
  onDone() {
    this.events++;
  }
  onProtocolError(e: NbdStreamError) {
    this.errors.push(e);
  }
}

/** Valid reply bytes to mutate: every chunk type, interleaved. */
function validReplies(structured: boolean): Buffer {
  const h = (cookie: number, type: number, flags: number, payload: Buffer) => {
    const b = Buffer.alloc(20);
    b.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    b.writeUInt32BE(cookie, 12);
    b.writeUInt32BE(payload.length, 16);
    return Buffer.concat([b, payload]);
  };
  const simple = (cookie: number, errno: number, payload = Buffer.alloc(0)) => {
    const b = Buffer.alloc(16);
    b.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
    b.writeUInt32BE(errno, 4);
    b.writeUInt32BE(cookie, 12);
    return Buffer.concat([b, payload]);
  };
  if (!structured) return Buffer.concat([simple(2, 0), simple(1, 0, Buffer.alloc(64, 7)), simple(4, 5)]);
  const off = (n: number) => {
    const b = Buffer.alloc(8);
    b.writeUInt32BE(n, 4);
    return b;
  };
  const bs = Buffer.alloc(20);
  bs.writeUInt32BE(1, 0);
  bs.writeUInt32BE(4096, 4);
  bs.writeUInt32BE(1 << 20, 12);
  bs.writeUInt32BE(3, 16);
  const hole = Buffer.concat([off(4128), Buffer.from([0, 0, 0, 32])]);
  const err = Buffer.concat([Buffer.from([0, 0, 0, 5, 0, 3]), Buffer.from('bad'), off(4)]);
  return Buffer.concat([
    h(1, P.NBD_REPLY_TYPE_OFFSET_DATA, 0, Buffer.concat([off(4096), Buffer.alloc(32, 9)])),
    simple(2, 0),
    h(3, P.NBD_REPLY_TYPE_BLOCK_STATUS, 1, bs),
    h(1, P.NBD_REPLY_TYPE_OFFSET_HOLE, 1, hole),
    h(4, P.NBD_REPLY_TYPE_ERROR_OFFSET, 1, err),
  ]);
}

/** The same kinds of replies with extended headers (32-byte headers, BLOCK_STATUS_EXT), built with the server's encoders. */
function validExtendedReplies(): Buffer {
  return Buffer.concat([
    toExtendedChunk(encodeOffsetDataHeader(0, 1n, 4096, 32), 4096),
    Buffer.alloc(32, 9),
    toExtendedChunk(encodeNoneChunk(2n), 0),
    encodeBlockStatusExt(P.NBD_REPLY_FLAG_DONE, 3n, 0, 1, [
      { length: 4096, flags: 0 },
      { length: 1 << 20, flags: 3 },
    ]),
    toExtendedChunk(encodeOffsetHole(P.NBD_REPLY_FLAG_DONE, 1n, 4128, 32), 4096),
    toExtendedChunk(encodeErrorChunk(4n, 5, 'bad', 4), 0),
  ]);
}

let decodeErrors = 0;
function decodeNeverThrows(input: Uint8Array, structured: boolean, cuts: number[], extended = false): void {
  const rec = new Counting();
  const d = new ReplyDecoder(rec, structured, extended);
  const buf = Buffer.from(input);
  let pos = 0;
  for (const c of [...cuts.map((x) => x % (buf.length + 1)).sort((a, b) => a - b), buf.length]) {
    if (c < pos) continue;
    d.push(buf.subarray(pos, c));
    pos = c;
  }
  expect(rec.errors.length).toBeLessThanOrEqual(1);
  for (const e of rec.errors) {
    expect(e).toBeInstanceOf(NbdStreamError);
    expect(e.code).toBe('ERR_PROTOCOL');
  }
  if (rec.errors.length) expect(d.dead).toBe(true);
  decodeErrors += rec.errors.length;
}

/** Mutations of a valid input: flip, overwrite, insert, delete, truncate. */
const mutated = (base: Buffer) =>
  fc
    .array(
      fc.oneof(
        fc.record({ op: fc.constant('set' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
        fc.record({ op: fc.constant('flip' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 7 }) }),
        fc.record({ op: fc.constant('insert' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
        fc.record({ op: fc.constant('delete' as const), at: fc.nat(), value: fc.constant(0) }),
        fc.record({ op: fc.constant('truncate' as const), at: fc.nat(), value: fc.constant(0) }),
      ),
      { minLength: 1, maxLength: 4 },
    )
    .map((ops) => {
      let b = Buffer.from(base);
      for (const { op, at, value } of ops) {
        const i = b.length ? at % b.length : 0;
        if (op === 'set' && b.length) b[i] = value;
        else if (op === 'flip' && b.length) b[i] ^= 1 << value;
        else if (op === 'insert') b = Buffer.concat([b.subarray(0, i), Buffer.from([value]), b.subarray(i)]);
        else if (op === 'delete' && b.length) b = Buffer.concat([b.subarray(0, i), b.subarray(i + 1)]);
        else if (op === 'truncate') b = b.subarray(0, i);
      }
      return new Uint8Array(b);
    });

describe('fuzz: ReplyDecoder', () => {
  it('never throws on random bytes (40k inputs, random splits)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 160 }), fc.boolean(), fc.array(fc.nat(), { maxLength: 4 }), (input, structured, cuts) => decodeNeverThrows(input, structured, cuts)),
      { numRuns: 40_000 },
    );
  });
  it('never throws on mutated valid streams, structured and simple (40k inputs)', () => {
    decodeErrors = 0;
    for (const structured of [true, false])
      fc.assert(
        fc.property(mutated(validReplies(structured)), fc.array(fc.nat(), { maxLength: 4 }), (input, cuts) => decodeNeverThrows(input, structured, cuts)),
        { numRuns: 20_000 },
      );
    // the mutations do reach the error paths (most of them, not all: some stay valid)
    expect(decodeErrors).toBeGreaterThan(10_000);
  });
  it('never throws on mutated valid streams with extended headers (20k inputs)', () => {
    decodeErrors = 0;
    fc.assert(
      fc.property(mutated(validExtendedReplies()), fc.array(fc.nat(), { maxLength: 4 }), (input, cuts) => decodeNeverThrows(input, true, cuts, true)),
      { numRuns: 20_000 },
    );
    expect(decodeErrors).toBeGreaterThan(5_000);
    const rec = new Counting();
    new ReplyDecoder(rec, true, true).push(validExtendedReplies());
    expect(rec.errors).toEqual([]);
    expect(rec.events).toBe(8);
  });
  it('decodes the unmutated valid streams without error', () => {
    for (const structured of [true, false]) {
      const rec = new Counting();
      new ReplyDecoder(rec, structured).push(validReplies(structured));
      expect(rec.errors).toEqual([]);
      expect(rec.events).toBe(structured ? 8 : 3);
    }
  });
});

// ------------------------------------------------------------------ handshake

function validHandshake(): Buffer {
  const u32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n >>> 0);
    return b;
  };
  const rep = (opt: number, type: number, data: Buffer) => {
    const b = Buffer.alloc(20);
    b.writeBigUInt64BE(P.NBD_REP_MAGIC, 0);
    b.writeUInt32BE(opt, 8);
    b.writeUInt32BE(type >>> 0, 12);
    b.writeUInt32BE(data.length, 16);
    return Buffer.concat([b, data]);
  };
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(P.NBDMAGIC, 0);
  greeting.writeBigUInt64BE(P.IHAVEOPT, 8);
  greeting.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
  const info = Buffer.alloc(12);
  info.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
  info.writeUInt32BE(1 << 20, 6);
  info.writeUInt16BE(0x1ed, 10);
  const bsz = Buffer.alloc(14);
  bsz.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
  bsz.writeUInt32BE(1, 2);
  bsz.writeUInt32BE(4096, 6);
  bsz.writeUInt32BE(1 << 25, 10);
  return Buffer.concat([
    greeting,
    rep(P.NBD_OPT_EXTENDED_HEADERS, P.NBD_REP_ERR_UNSUP, Buffer.alloc(0)), // as nbdkit 1.32 and qemu 7.2
    rep(P.NBD_OPT_STRUCTURED_REPLY, P.NBD_REP_ACK, Buffer.alloc(0)),
    rep(P.NBD_OPT_SET_META_CONTEXT, P.NBD_REP_META_CONTEXT, Buffer.concat([u32(1), Buffer.from('base:allocation')])),
    rep(P.NBD_OPT_SET_META_CONTEXT, P.NBD_REP_ACK, Buffer.alloc(0)),
    rep(P.NBD_OPT_GO, P.NBD_REP_INFO, info),
    rep(P.NBD_OPT_GO, P.NBD_REP_INFO, bsz),
    rep(P.NBD_OPT_GO, P.NBD_REP_ACK, Buffer.alloc(0)),
  ]);
}

/** Run the client handshake against canned server bytes; EOF rejects like a closed socket. */
async function handshakeOn(input: Uint8Array): Promise<'ok' | string> {
  let pos = 0;
  const buf = Buffer.from(input);
  try {
    await clientHandshake(
      {
        read: async (n) => {
          if (pos + n > buf.length) throw new NbdStreamError('ERR_CLOSED', 'server closed the connection');
          const b = buf.subarray(pos, pos + n);
          pos += n;
          return b;
        },
        write: () => undefined,
        startTls: async () => {
          throw new NbdStreamError('ERR_TLS', 'no TLS here');
        },
      },
      { exportName: '', tls: 'off', structuredReplies: true, metaContexts: ['base:allocation'] },
    );
    return 'ok';
  } catch (e) {
    if (!(e instanceof NbdStreamError)) throw new Error(`uncoded error: ${(e as Error)?.stack ?? e}`);
    if (!CODES.has(e.code)) throw new Error(`unexpected code ${e.code}: ${e.message}`);
    return e.code;
  }
}

describe('fuzz: client handshake', () => {
  it('accepts the valid server side', async () => {
    expect(await handshakeOn(validHandshake())).toBe('ok');
  });
  it('rejects random bytes with a coded error (10k inputs)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 120 }), async (input) => {
        expect(await handshakeOn(input)).not.toBe('ok');
      }),
      { numRuns: 10_000 },
    );
  });
  it('handles mutated valid handshakes: success or a coded error (20k inputs)', async () => {
    const outcomes = new Map<string, number>();
    await fc.assert(
      fc.asyncProperty(mutated(validHandshake()), async (input) => {
        const r = await handshakeOn(input);
        outcomes.set(r, (outcomes.get(r) ?? 0) + 1);
        expect(r === 'ok' || CODES.has(r)).toBe(true);
      }),
      { numRuns: 20_000 },
    );
    expect(outcomes.get('ERR_PROTOCOL')).toBeGreaterThan(1000);
    expect(outcomes.get('ERR_CLOSED')).toBeGreaterThan(1000);
  });
});
