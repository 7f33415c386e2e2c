import { describe, expect, it } from 'vitest';
import { encodeExtendedRequest, encodeGo, encodeMetaContext, encodeOption, encodeRequest } from '../../lib/nbd/encode.js';
import {
  ReplyDecoder,
  parseExportNameReply,
  parseGreeting,
  parseInfoReply,
  parseMetaContextReply,
  parseOptionReplyHeader,
  type Extent,
  type PendingRequest,
  type ReplyHandler,
} from '../../lib/nbd/decode.js';
import * as P from '../../lib/nbd/protocol.js';
import { NbdStreamError } from '../../lib/errors.js';

// ----------------------------------------------------------------- builders for server bytes

function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(Math.floor(n / 2 ** 32), 0);
  b.writeUInt32BE(n % 2 ** 32, 4);
  return b;
}
function simple(cookie: number, errno: number, payload = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(errno, 4);
  h.writeUInt32BE(cookie, 12);
  return Buffer.concat([h, payload]);
}
function chunk(cookie: number, type: number, flags: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(cookie, 12);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}
const DONE = P.NBD_REPLY_FLAG_DONE;
const data = (cookie: number, offset: number, bytes: Buffer, flags = 0) => chunk(cookie, P.NBD_REPLY_TYPE_OFFSET_DATA, flags, Buffer.concat([u64(offset), bytes]));
function hole(cookie: number, offset: number, length: number, flags = 0): Buffer {
  const l = Buffer.alloc(4);
  l.writeUInt32BE(length);
  return chunk(cookie, P.NBD_REPLY_TYPE_OFFSET_HOLE, flags, Buffer.concat([u64(offset), l]));
}
function blockStatus(cookie: number, id: number, extents: Extent[], flags = DONE): Buffer {
  const b = Buffer.alloc(4 + 8 * extents.length);
  b.writeUInt32BE(id, 0);
  extents.forEach((e, i) => {
    b.writeUInt32BE(e.length, 4 + 8 * i);
    b.writeUInt32BE(e.flags, 8 + 8 * i);
  });
  return chunk(cookie, P.NBD_REPLY_TYPE_BLOCK_STATUS, flags, b);
}
function error(cookie: number, errno: number, msg: string, offset?: number, flags = DONE): Buffer {
  const m = Buffer.from(msg);
  const h = Buffer.alloc(6);
  h.writeUInt32BE(errno, 0);
  h.writeUInt16BE(m.length, 4);
  const parts = [h, m];
  if (offset !== undefined) parts.push(u64(offset));
  return chunk(cookie, offset === undefined ? P.NBD_REPLY_TYPE_ERROR : P.NBD_REPLY_TYPE_ERROR_OFFSET, flags, Buffer.concat(parts));
}
const none = (cookie: number) => chunk(cookie, P.NBD_REPLY_TYPE_NONE, DONE, Buffer.alloc(0));

// ----------------------------------------------------------------- a recording handler

class Recorder implements ReplyHandler {
  events: string[] = [];
  errors: NbdStreamError[] = [];
  constructor(public reqs: Map<number, PendingRequest>) {}
  lookup(c: number) {
    return this.reqs.get(c);
  }
  onSimpleReply(c: number, e: number) {
    const r = this.reqs.get(c)!;
    this.events.push(`simple ${c} ${e}${r.dest && e === 0 ? ' ' + r.dest.toString('hex') : ''}`);
  }
  onData(c: number, o: number, l: number) {
    const r = this.reqs.get(c)!;
    this.events.push(`data ${c} ${o}+${l} ${r.dest!.subarray(o - r.offset, o - r.offset + l).toString('hex')}`);
  }
  onHole(c: number, o: number, l: number) {
    this.events.push(`hole ${c} ${o}+${l}`);
  }
  onBlockStatus(c: number, id: number, ex: Extent[]) {
    this.events.push(`bs ${c} ${id} ${ex.map((e) => `${e.length}/${e.flags}`).join(',')}`);
  }
  onError(c: number, e: number, m: string, o: number | undefined) {
    this.events.push(`error ${c} ${e} "${m}" ${o}`);
  }
  onDone(c: number) {
    this.events.push(`done ${c}`);
  }
  onProtocolError(err: NbdStreamError) {
    this.errors.push(err);
  }
}

function requests(): Map<number, PendingRequest> {
  return new Map<number, PendingRequest>([
    [1, { type: P.NBD_CMD_READ, offset: 4096, length: 8, dest: Buffer.alloc(8) }],
    [2, { type: P.NBD_CMD_WRITE, offset: 0, length: 4 }],
    [3, { type: P.NBD_CMD_BLOCK_STATUS, offset: 0, length: 1 << 20 }],
    [4, { type: P.NBD_CMD_READ, offset: 0, length: 4, dest: Buffer.alloc(4) }],
  ]);
}

/** Feed `input` split at `cut`, also byte by byte; every split must give the same events. */
function decodeAllSplits(input: Buffer, structured: boolean, extended = false): { events: string[]; errors: string[] } {
  const run = (pieces: Buffer[]) => {
    const rec = new Recorder(extended ? extRequests() : requests());
    const d = new ReplyDecoder(rec, structured, extended);
    for (const p of pieces) d.push(p);
    return { events: rec.events, errors: rec.errors.map((e) => `${e.code}: ${e.message}`) };
  };
  const whole = run([input]);
  for (let cut = 0; cut <= input.length; cut++) expect(run([input.subarray(0, cut), input.subarray(cut)])).toEqual(whole);
  expect(run([...input].map((b) => Buffer.from([b])))).toEqual(whole);
  return whole;
}

describe('encode', () => {
  it('encodes a request header as 28 big-endian bytes', () => {
    const b = encodeRequest(P.NBD_CMD_FLAG_NO_HOLE, P.NBD_CMD_WRITE_ZEROES, 0x01020304, 2 ** 40 + 5, 0x10000);
    expect(b.toString('hex')).toBe('25609513' + '0002' + '0006' + '00000000' + '01020304' + '0000010000000005' + '00010000');
  });
  it('encodes options, GO and SET_META_CONTEXT', () => {
    expect(encodeOption(P.NBD_OPT_STRUCTURED_REPLY).toString('hex')).toBe('49484156454f5054' + '00000008' + '00000000');
    expect(encodeGo('ab', [P.NBD_INFO_BLOCK_SIZE]).toString('hex')).toBe('49484156454f5054' + '00000007' + '0000000a' + '00000002' + '6162' + '0001' + '0003');
    expect(encodeMetaContext(P.NBD_OPT_SET_META_CONTEXT, '', ['base:allocation']).toString('hex')).toBe(
      '49484156454f5054' + '0000000a' + '0000001b' + '00000000' + '00000001' + '0000000f' + Buffer.from('base:allocation').toString('hex'),
    );
  });
});

describe('handshake parsers', () => {
  it('accepts newstyle and names oldstyle and non-NBD peers', () => {
    expect(() => parseGreeting(Buffer.from('4e42444d41474943' + '49484156454f5054', 'hex'))).not.toThrow();
    expect(() => parseGreeting(Buffer.from('4e42444d41474943' + '0000420281861253', 'hex'))).toThrow(/oldstyle/);
    expect(() => parseGreeting(Buffer.from('HTTP/1.1 400 Bad Request'))).toThrow(/not an NBD server/);
  });
  it('parses option replies, infos, meta contexts and EXPORT_NAME replies', () => {
    const h = Buffer.from('0003e889045565a9' + '00000007' + '00000003' + '0000000c', 'hex');
    expect(parseOptionReplyHeader(h)).toEqual({ option: 7, type: 3, length: 12 });
    expect(() => parseOptionReplyHeader(Buffer.alloc(20))).toThrow(expect.objectContaining({ code: 'ERR_PROTOCOL' }));
    expect(parseInfoReply(Buffer.from('0000' + '0000000100000000' + '0043', 'hex'))).toEqual({ type: 0, size: 2n ** 32n, flags: 0x43 });
    expect(parseInfoReply(Buffer.from('0003' + '00000200' + '00001000' + '02000000', 'hex'))).toEqual({ type: 3, minimum: 512, preferred: 4096, maximum: 32 << 20 });
    expect(() => parseInfoReply(Buffer.from('0003' + '00000300' + '00001000' + '02000000', 'hex'))).toThrow(/invalid NBD_INFO_BLOCK_SIZE/);
    expect(() => parseInfoReply(Buffer.from('0000' + '00000001', 'hex'))).toThrow(/NBD_INFO_EXPORT has length 6/);
    expect(parseMetaContextReply(Buffer.from('00000005' + Buffer.from('base:allocation').toString('hex'), 'hex'))).toEqual({ id: 5, name: 'base:allocation' });
    expect(parseExportNameReply(Buffer.from('0000000000100000' + '0003', 'hex'))).toEqual({ size: 1n << 20n, flags: 3 });
  });
});

describe('ReplyDecoder', () => {
  it('decodes simple replies, with read payload, at every split', () => {
    const input = Buffer.concat([simple(2, 0), simple(1, 0, Buffer.from('0102030405060708', 'hex')), simple(4, 5)]);
    expect(decodeAllSplits(input, false)).toEqual({ events: ['simple 2 0', 'simple 1 0 0102030405060708', 'simple 4 5'], errors: [] });
  });

  it('decodes every structured chunk type, interleaved, at every split', () => {
    const input = Buffer.concat([
      data(1, 4100, Buffer.from('aabbccdd', 'hex')),
      simple(2, 0), // allowed for non-read commands
      blockStatus(3, 1, [
        { length: 4096, flags: 0 },
        { length: 1 << 20, flags: 3 },
      ]),
      hole(1, 4096, 4, DONE),
      error(4, 5, 'bad sector', 2),
    ]);
    expect(decodeAllSplits(input, true)).toEqual({
      events: ['data 1 4100+4 aabbccdd', 'simple 2 0', 'bs 3 1 4096/0,1048576/3', 'done 3', 'hole 1 4096+4', 'done 1', 'error 4 5 "bad sector" 2', 'done 4'],
      errors: [],
    });
  });

  it('decodes NONE, plain ERROR and a done data chunk', () => {
    const input = Buffer.concat([none(2), error(3, 22, 'no'), data(4, 0, Buffer.from('01020304', 'hex'), DONE)]);
    expect(decodeAllSplits(input, true).events).toEqual(['done 2', 'error 3 22 "no" undefined', 'done 3', 'data 4 0+4 01020304', 'done 4']);
  });

  const malformed: Array<[string, Buffer, boolean, RegExp]> = [
    ['bad magic', Buffer.from('deadbeef000000000000000000000001', 'hex'), true, /bad reply magic 0xdeadbeef/],
    ['unknown cookie', simple(99, 0), false, /unknown cookie/],
    ['structured reply when not negotiated', none(2), false, /structured replies were not negotiated/],
    ['simple reply to a read after structured replies', simple(1, 0, Buffer.alloc(8)), true, /simple reply to NBD_CMD_READ/],
    ['data chunk past the request', data(1, 4100, Buffer.alloc(8)), true, /outside the request/],
    ['data chunk before the request', data(1, 0, Buffer.alloc(4)), true, /outside the request/],
    ['empty data chunk', data(1, 4096, Buffer.alloc(0)), true, /OFFSET_DATA chunk with length 8/],
    ['data chunk for a write', data(2, 0, Buffer.alloc(4)), true, /OFFSET_DATA chunk in reply to NBD_CMD_WRITE/],
    ['zero-length hole', hole(1, 4096, 0), true, /zero length/],
    ['hole past the request', hole(1, 4096, 9), true, /outside the request/],
    ['block status for a read', blockStatus(1, 1, [{ length: 1, flags: 0 }]), true, /BLOCK_STATUS chunk in reply to NBD_CMD_READ/],
    ['block status without extents', chunk(3, P.NBD_REPLY_TYPE_BLOCK_STATUS, DONE, Buffer.alloc(4)), true, /BLOCK_STATUS chunk with length 4/],
    ['NONE without DONE', chunk(2, P.NBD_REPLY_TYPE_NONE, 0, Buffer.alloc(0)), true, /without NBD_REPLY_FLAG_DONE/],
    ['NONE with payload', chunk(2, P.NBD_REPLY_TYPE_NONE, DONE, Buffer.alloc(1)), true, /NONE with length 1/],
    ['unknown chunk type', chunk(2, 77, DONE, Buffer.alloc(0)), true, /unknown structured reply chunk type 77/],
    ['error chunk with errno 0', error(2, 0, ''), true, /error value 0/],
    ['error message longer than chunk', chunk(2, P.NBD_REPLY_TYPE_ERROR, DONE, Buffer.from('00000005ffff', 'hex')), true, /does not match its message length/],
    ['error offset outside request', error(1, 5, '', 9999), true, /ERROR_OFFSET 9999 outside/],
    ['oversized chunk', chunk(2, P.NBD_REPLY_TYPE_ERROR, DONE, Buffer.alloc(0)).fill(0xff, 16, 20), true, /too large/],
    // the first half twice, then DONE: as many bytes as asked for, but the second half missing
    [
      'a repeated data chunk',
      Buffer.concat([data(1, 4096, Buffer.alloc(4, 1)), data(1, 4096, Buffer.alloc(4, 1)), none(1)]),
      true,
      /^OFFSET_DATA chunk 4096\+4 overlaps 4096\+4 already received for the read 4096\+8$/,
    ],
    ['a hole over data', Buffer.concat([data(1, 4098, Buffer.alloc(4, 1)), hole(1, 4096, 4, DONE)]), true, /^OFFSET_HOLE chunk 4096\+4 overlaps 4098\+2 already received for the read 4096\+8$/],
    ['data over a hole', Buffer.concat([hole(1, 4100, 4), data(1, 4096, Buffer.alloc(6, 1), DONE)]), true, /^OFFSET_DATA chunk 4096\+6 overlaps 4100\+2 already received for the read 4096\+8$/],
    [
      'a chunk inside two earlier ones',
      Buffer.concat([hole(1, 4096, 2), data(1, 4102, Buffer.alloc(2, 1)), data(1, 4097, Buffer.alloc(6, 1), DONE)]),
      true,
      /^OFFSET_DATA chunk 4097\+6 overlaps 4097\+1 already received for the read 4096\+8$/,
    ],
  ];
  for (const [name, input, structured, re] of malformed) {
    it(`reports a protocol error for ${name}, never throwing`, () => {
      const rec = new Recorder(requests());
      const d = new ReplyDecoder(rec, structured);
      for (let cut = 0; cut <= input.length; cut++) {
        const r = new Recorder(requests());
        const dd = new ReplyDecoder(r, structured);
        expect(() => {
          dd.push(input.subarray(0, cut));
          dd.push(input.subarray(cut));
          dd.push(Buffer.alloc(64, 0x5a)); // anything after a violation is ignored
        }).not.toThrow();
        if (r.errors.length) expect(r.errors[0].message).toMatch(re);
      }
      d.push(input);
      expect(rec.errors).toHaveLength(1);
      expect(rec.errors[0].code).toBe('ERR_PROTOCOL');
      expect(rec.errors[0].message).toMatch(re);
      expect(d.dead).toBe(true);
    });
  }

  it('accepts read chunks in any order that cover the request once, at every split', () => {
    const input = Buffer.concat([
      data(1, 4102, Buffer.from('0708', 'hex')),
      hole(1, 4096, 2),
      data(4, 0, Buffer.from('01020304', 'hex'), DONE),
      data(1, 4099, Buffer.from('040506', 'hex')),
      data(1, 4098, Buffer.from('03', 'hex'), DONE),
      // cookie 1 again, after DONE: a new reply (cookies are reused) starts afresh
      data(1, 4096, Buffer.alloc(8, 9), DONE),
    ]);
    expect(decodeAllSplits(input, true)).toEqual({
      events: ['data 1 4102+2 0708', 'hole 1 4096+2', 'data 4 0+4 01020304', 'done 4', 'data 1 4099+3 040506', 'data 1 4098+1 03', 'done 1', 'data 1 4096+8 0909090909090909', 'done 1'],
      errors: [],
    });
  });

  it('fails a data chunk received elsewhere (the native reader) that overlaps one before it', () => {
    const rec = new Recorder(requests());
    const d = new ReplyDecoder(rec, true);
    d.dataReceived(1, 4096, 4, 0);
    d.dataReceived(1, 4096, 4, 0);
    d.push(none(1));
    expect(rec.events).toEqual(['data 1 4096+4 00000000']);
    expect(rec.errors.map((e) => `${e.code}: ${e.message}`)).toEqual(['ERR_PROTOCOL: OFFSET_DATA chunk 4096+4 overlaps 4096+4 already received for the read 4096+8']);
  });

  it('lets read payloads land directly in the request buffer (zero-copy path)', () => {
    const reqs = requests();
    const rec = new Recorder(reqs);
    const d = new ReplyDecoder(rec, true);
    const input = data(1, 4096, Buffer.from('1122334455667788', 'hex'), DONE);
    let pos = 0;
    let sawDest = false;
    while (pos < input.length) {
      const b = d.nextBuffer();
      if (b.buffer === reqs.get(1)!.dest!.buffer && b.byteOffset === reqs.get(1)!.dest!.byteOffset) sawDest = true;
      const n = Math.min(b.length, input.length - pos, 3);
      input.copy(b, 0, pos, pos + n);
      d.advance(n);
      pos += n;
    }
    expect(sawDest).toBe(true);
    expect(rec.events).toEqual(['data 1 4096+8 1122334455667788', 'done 1']);
    expect(d.idle).toBe(true);
  });
});

// ----------------------------------------------------------------- extended headers

/** A structured chunk built above, re-framed with the 32-byte extended header (request offset `reqOffset`). */
function ext(structuredChunk: Buffer, reqOffset = 0): Buffer {
  const h = Buffer.alloc(32);
  h.writeUInt32BE(P.NBD_EXTENDED_REPLY_MAGIC, 0);
  structuredChunk.copy(h, 4, 4, 16); // flags, type, cookie
  u64(reqOffset).copy(h, 16);
  u64(structuredChunk.readUInt32BE(16)).copy(h, 24);
  return Buffer.concat([h, structuredChunk.subarray(20)]);
}
function blockStatusExt(cookie: number, id: number, extents: Array<{ length: number; status: bigint }>, flags = DONE, count = extents.length): Buffer {
  const b = Buffer.alloc(8 + 16 * extents.length);
  b.writeUInt32BE(id, 0);
  b.writeUInt32BE(count, 4);
  extents.forEach((e, i) => {
    u64(e.length).copy(b, 8 + 16 * i);
    b.writeBigUInt64BE(e.status, 16 + 16 * i);
  });
  return ext(chunk(cookie, P.NBD_REPLY_TYPE_BLOCK_STATUS_EXT, flags, b));
}

function extRequests(): Map<number, PendingRequest> {
  const m = requests();
  m.set(5, { type: P.NBD_CMD_BLOCK_STATUS, offset: 2 ** 40, length: 2 ** 41 });
  return m;
}

describe('extended headers', () => {
  it('encodes a request header as 32 bytes with a 64-bit length', () => {
    expect(encodeExtendedRequest(P.NBD_CMD_FLAG_NO_HOLE, P.NBD_CMD_WRITE_ZEROES, 7, 2 ** 40, 2 ** 41 + 4096).toString('hex')).toBe(
      '21e41c71' + '0002' + '0006' + '0000000000000007' + '0000010000000000' + '0000020000001000',
    );
  });

  it('decodes every chunk type, interleaved, at every split; block status lengths beyond 32 bits', () => {
    const input = Buffer.concat([
      ext(data(1, 4100, Buffer.from('aabbccdd', 'hex')), 4096),
      ext(none(2)),
      blockStatusExt(5, 1, [
        { length: 2 ** 40, status: 3n },
        { length: 2 ** 41, status: 0n },
      ]),
      ext(hole(1, 4096, 4, DONE), 4096),
      blockStatusExt(3, 1, [{ length: 1 << 20, status: 1n }]),
      ext(error(4, 5, 'bad sector', 2)),
    ]);
    expect(decodeAllSplits(input, true, true)).toEqual({
      events: ['data 1 4100+4 aabbccdd', 'done 2', 'bs 5 1 1099511627776/3,2199023255552/0', 'done 5', 'hole 1 4096+4', 'done 1', 'bs 3 1 1048576/1', 'done 3', 'error 4 5 "bad sector" 2', 'done 4'],
      errors: [],
    });
  });

  it('lets read payloads land directly in the request buffer', () => {
    const reqs = extRequests();
    const rec = new Recorder(reqs);
    const d = new ReplyDecoder(rec, true, true);
    const input = ext(data(1, 4096, Buffer.from('1122334455667788', 'hex'), DONE), 4096);
    let pos = 0;
    let sawDest = false;
    while (pos < input.length) {
      const b = d.nextBuffer();
      if (b.buffer === reqs.get(1)!.dest!.buffer && b.byteOffset === reqs.get(1)!.dest!.byteOffset) sawDest = true;
      const n = Math.min(b.length, input.length - pos);
      input.copy(b, 0, pos, pos + n);
      d.advance(n);
      pos += n;
    }
    expect(sawDest).toBe(true);
    expect(rec.events).toEqual(['data 1 4096+8 1122334455667788', 'done 1']);
    expect(d.idle).toBe(true);
  });

  const malformed: Array<[string, Buffer, boolean, string]> = [
    ['an extended reply without negotiation', ext(none(2)), false, 'extended reply received but extended headers were not negotiated'],
    ['a simple reply after negotiation', simple(2, 0), true, 'simple reply received after extended headers were negotiated'],
    ['a structured reply after negotiation', none(2), true, 'structured reply received after extended headers were negotiated'],
    ['bad magic', Buffer.alloc(32, 0xde), true, 'reply magic 0xdededede received after extended headers were negotiated'],
    ['a 32-bit BLOCK_STATUS chunk', ext(blockStatus(3, 1, [{ length: 1, flags: 0 }])), true, 'BLOCK_STATUS chunk received after extended headers were negotiated (BLOCK_STATUS_EXT expected)'],
    ['BLOCK_STATUS_EXT for a read', blockStatusExt(1, 1, [{ length: 8, status: 0n }]), true, 'BLOCK_STATUS_EXT chunk in reply to NBD_CMD_READ'],
    ['BLOCK_STATUS_EXT with a wrong count', blockStatusExt(3, 1, [{ length: 8, status: 0n }], DONE, 2), true, 'BLOCK_STATUS_EXT chunk of 24 bytes with 2 descriptors'],
    ['BLOCK_STATUS_EXT without descriptors', blockStatusExt(3, 1, []), true, 'BLOCK_STATUS_EXT chunk with length 8'],
    ['a status beyond 32 bits', blockStatusExt(3, 1, [{ length: 8, status: 1n << 32n }]), true, 'BLOCK_STATUS_EXT descriptor with status 0x100000000'],
    ['a data chunk longer than the read', ext(data(1, 4096, Buffer.alloc(9))), true, 'OFFSET_DATA chunk with length 17'],
    ['a data chunk past the read', ext(data(1, 4100, Buffer.alloc(8))), true, 'OFFSET_DATA chunk 4100+8 outside the request 4096+8'],
    ['a data chunk for a write', ext(data(2, 0, Buffer.alloc(4))), true, 'OFFSET_DATA chunk in reply to NBD_CMD_WRITE'],
    ['an unknown cookie', ext(none(99)), true, 'reply for unknown cookie 0x000000063'],
  ];
  for (const [name, input, extended, message] of malformed) {
    it(`reports a protocol error for ${name}, at every split`, () => {
      for (let cut = 0; cut <= input.length; cut++) {
        const r = new Recorder(extRequests());
        const d = new ReplyDecoder(r, true, extended);
        expect(() => {
          d.push(input.subarray(0, cut));
          d.push(input.subarray(cut));
          d.push(Buffer.alloc(64, 0x5a)); // anything after a violation is ignored
        }).not.toThrow();
        expect(r.errors.map((e) => `${e.code}: ${e.message}`)).toEqual([`ERR_PROTOCOL: ${message}`]);
        expect(d.dead).toBe(true);
      }
    });
  }
});
