/**
 * The server-side codec (lib/nbd/server-codec.ts): what the server encodes is checked by the
 * client's own parsers (decode.ts), and the client's encoders (encode.ts) feed the server's
 * decoder — every input split at every byte boundary and byte by byte must give the same events.
 */
import { describe, expect, it } from 'vitest';
import { encodeClientFlags, encodeExtendedRequest, encodeGo, encodeMetaContext, encodeOption, encodeRequest } from '../../lib/nbd/encode.js';
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
import {
  ServerDecoder,
  encodeBlockStatus,
  encodeBlockStatusExt,
  encodeChunkHeader,
  encodeExtendedChunkHeader,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
  encodeSimpleReply,
  parseExportNameData,
  parseGoData,
  parseMetaContextData,
  protocolString,
  toExtendedChunk,
  type ClientRequest,
  type ServerDecoderOptions,
} from '../../lib/nbd/server-codec.js';
import * as P from '../../lib/nbd/protocol.js';
import { NbdStreamError } from '../../lib/errors.js';

/** Every split of `input` in two, and byte by byte. */
function splits(input: Buffer): Buffer[][] {
  const out: Buffer[][] = [[input]];
  for (let cut = 0; cut <= input.length; cut++) out.push([input.subarray(0, cut), input.subarray(cut)]);
  out.push([...input].map((b) => Buffer.from([b])));
  return out;
}

// ================================================================ encoders, read back by the client

describe('handshake encoders', () => {
  it('greeting: NBDMAGIC, IHAVEOPT, flags', () => {
    const g = encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
    expect(g.toString('hex')).toBe('4e42444d41474943' + '49484156454f5054' + '0003');
    expect(() => parseGreeting(g.subarray(0, 16))).not.toThrow();
  });

  it('option replies, infos, LIST entries and meta contexts parse with the client parsers', () => {
    const r = encodeOptionReply(P.NBD_OPT_GO, P.NBD_REP_INFO, encodeInfoExport(2 ** 40 + 3, 0x1ed));
    expect(parseOptionReplyHeader(r)).toEqual({ option: P.NBD_OPT_GO, type: P.NBD_REP_INFO, length: 12 });
    expect(parseInfoReply(r.subarray(20))).toEqual({ type: P.NBD_INFO_EXPORT, size: 2n ** 40n + 3n, flags: 0x1ed });
    expect(parseInfoReply(encodeInfoBlockSize(1, 4096, 32 << 20))).toEqual({ type: P.NBD_INFO_BLOCK_SIZE, minimum: 1, preferred: 4096, maximum: 32 << 20 });
    expect(encodeInfoString(P.NBD_INFO_NAME, 'disk').toString('hex')).toBe('0001' + Buffer.from('disk').toString('hex'));
    expect(encodeInfoString(P.NBD_INFO_DESCRIPTION, 'a b').toString('hex')).toBe('0002' + Buffer.from('a b').toString('hex'));
    expect(encodeRepServer('disk', 'my disk').toString('hex')).toBe('00000004' + Buffer.from('diskmy disk').toString('hex'));
    expect(parseMetaContextReply(encodeRepMetaContext(7, 'base:allocation'))).toEqual({ id: 7, name: 'base:allocation' });
    const e = encodeOptionError(P.NBD_OPT_LIST, P.NBD_REP_ERR_TLS_REQD, 'TLS first');
    expect(parseOptionReplyHeader(e)).toEqual({ option: P.NBD_OPT_LIST, type: P.NBD_REP_ERR_TLS_REQD, length: 9 });
    expect(e.subarray(20).toString()).toBe('TLS first');
    expect(encodeOptionReply(P.NBD_OPT_ABORT, P.NBD_REP_ACK).toString('hex')).toBe('0003e889045565a9' + '00000002' + '00000001' + '00000000');
  });

  it('EXPORT_NAME reply: 10 bytes with NO_ZEROES, else 124 zeroes more', () => {
    expect(parseExportNameReply(encodeExportNameReply(1 << 20, 0x43, true))).toEqual({ size: 1n << 20n, flags: 0x43 });
    const long = encodeExportNameReply(512, 1, false);
    expect(long.length).toBe(134);
    expect(long.subarray(10).equals(Buffer.alloc(124))).toBe(true);
  });

  it('cuts strings at 4096 bytes without splitting a character', () => {
    expect(protocolString('x'.repeat(5000)).length).toBe(4096);
    const s = protocolString('x'.repeat(4095) + 'é'); // é is 2 bytes: would end at 4097
    expect(s.length).toBe(4095);
    expect(s.toString()).toBe('x'.repeat(4095));
    expect(encodeErrorChunk(1n, 5, 'm'.repeat(10000)).readUInt16BE(24)).toBe(4096);
  });
});

class Recorder implements ReplyHandler {
  events: string[] = [];
  errors: string[] = [];
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
    this.errors.push(`${err.code}: ${err.message}`);
  }
}

function clientDecodeAllSplits(input: Buffer, structured: boolean, extended = false) {
  const run = (pieces: Buffer[]) => {
    const rec = new Recorder(
      new Map<number, PendingRequest>([
        [1, { type: P.NBD_CMD_READ, offset: 4096, length: 12, dest: Buffer.alloc(12) }],
        [2, { type: P.NBD_CMD_WRITE, offset: 0, length: 4 }],
        [3, { type: P.NBD_CMD_BLOCK_STATUS, offset: 0, length: 1 << 20 }],
        [4, { type: P.NBD_CMD_READ, offset: 0, length: 4, dest: Buffer.alloc(4) }],
        [5, { type: P.NBD_CMD_BLOCK_STATUS, offset: 2 ** 40, length: 2 ** 41 }],
      ]),
    );
    const d = new ReplyDecoder(rec, structured, extended);
    for (const p of pieces) d.push(p);
    return { events: rec.events, errors: rec.errors };
  };
  const all = splits(input).map(run);
  for (const r of all) expect(r).toEqual(all[0]);
  return all[0];
}

describe('transmission encoders, decoded by the client ReplyDecoder', () => {
  it('simple replies, with a read payload', () => {
    const input = Buffer.concat([encodeSimpleReply(2n, 0), encodeSimpleReply(4n, 0), Buffer.from('01020304', 'hex'), encodeSimpleReply(1n, 5)]);
    expect(clientDecodeAllSplits(input, false)).toEqual({ events: ['simple 2 0', 'simple 4 0 01020304', 'simple 1 5'], errors: [] });
  });

  it('every structured chunk type', () => {
    const input = Buffer.concat([
      encodeOffsetHole(0, 1n, 4096, 4),
      encodeOffsetDataHeader(0, 1n, 4100, 4),
      Buffer.from('aabbccdd', 'hex'),
      encodeBlockStatus(P.NBD_REPLY_FLAG_DONE, 3n, 1, [
        { length: 4096, flags: 0 },
        { length: 1 << 20, flags: P.NBD_STATE_HOLE | P.NBD_STATE_ZERO },
      ]),
      encodeErrorChunk(2n, 1, 'read-only'),
      encodeOffsetDataHeader(P.NBD_REPLY_FLAG_DONE, 1n, 4104, 4),
      Buffer.from('01020304', 'hex'),
      encodeErrorChunk(4n, 5, 'bad sector', 2),
    ]);
    expect(clientDecodeAllSplits(input, true)).toEqual({
      events: [
        'hole 1 4096+4',
        'data 1 4100+4 aabbccdd',
        'bs 3 1 4096/0,1048576/3',
        'done 3',
        'error 2 1 "read-only" undefined',
        'done 2',
        'data 1 4104+4 01020304',
        'done 1',
        'error 4 5 "bad sector" 2',
        'done 4',
      ],
      errors: [],
    });
  });

  it('NONE chunk and raw chunk headers', () => {
    expect(clientDecodeAllSplits(encodeNoneChunk(2n), true).events).toEqual(['done 2']);
    expect(encodeChunkHeader(1, 2, 0x0102030405060708n, 9).toString('hex')).toBe('668e33ef' + '0001' + '0002' + '0102030405060708' + '00000009');
  });

  it('echoes all 64 bits of a cookie', () => {
    expect(encodeSimpleReply(0xfedcba9876543210n, 22).toString('hex')).toBe('67446698' + '00000016' + 'fedcba9876543210');
    expect(encodeOffsetHole(1, 0xffffffffffffffffn, 2 ** 50, 512).toString('hex')).toBe(
      '668e33ef' + '0001' + '0002' + 'ffffffffffffffff' + '0000000c' + '0004000000000000' + '00000200',
    );
  });
});

// ================================================================ option data parsers

describe('option data parsers', () => {
  it('parses GO/INFO data as the client encodes it', () => {
    const opt = encodeGo('disk', [P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME]);
    expect(parseGoData(opt.subarray(16))).toEqual({ name: 'disk', infos: [3, 1] });
    expect(parseGoData(encodeGo('', []).subarray(16))).toEqual({ name: '', infos: [] });
  });
  it('refuses malformed GO data', () => {
    const good = encodeGo('disk', [3]).subarray(16);
    expect(() => parseGoData(good.subarray(0, good.length - 1))).toThrow(/does not match 1 information requests/);
    expect(() => parseGoData(Buffer.concat([good, Buffer.alloc(2)]))).toThrow(/does not match/);
    expect(() => parseGoData(Buffer.from('000000ff00', 'hex'))).toThrow(/runs past the end/);
    expect(() => parseGoData(Buffer.from('00000002', 'hex'))).toThrow(/runs past the end/);
    expect(() => parseGoData(Buffer.from('00', 'hex'))).toThrow(/length field past the end/);
    expect(() => parseGoData(Buffer.from('00000001' + '00' + '0000', 'hex'))).toThrow(/NUL/);
    expect(() => parseGoData(Buffer.from('00001001', 'hex'))).toThrow(/at most 4096/);
    expect(() => parseGoData(Buffer.alloc(0))).toThrow(expect.objectContaining({ code: 'ERR_PROTOCOL' }));
  });
  it('parses and refuses meta context data', () => {
    const opt = encodeMetaContext(P.NBD_OPT_SET_META_CONTEXT, 'x', ['base:allocation', 'qemu:dirty-bitmap:b']);
    expect(parseMetaContextData(opt.subarray(16))).toEqual({ name: 'x', queries: ['base:allocation', 'qemu:dirty-bitmap:b'] });
    expect(parseMetaContextData(encodeMetaContext(P.NBD_OPT_LIST_META_CONTEXT, '', []).subarray(16))).toEqual({ name: '', queries: [] });
    const d = opt.subarray(16);
    expect(() => parseMetaContextData(d.subarray(0, d.length - 1))).toThrow(/runs past the end/);
    expect(() => parseMetaContextData(Buffer.concat([d, Buffer.alloc(1)]))).toThrow(/1 bytes after the last query/);
    expect(() => parseMetaContextData(d.subarray(0, 5))).toThrow(/query count missing/);
  });
  it('parses EXPORT_NAME data', () => {
    expect(parseExportNameData(Buffer.from('disk'))).toBe('disk');
    expect(() => parseExportNameData(Buffer.from('a\0b'))).toThrow(/NUL/);
    expect(() => parseExportNameData(Buffer.alloc(4097, 0x61))).toThrow(/at most 4096/);
  });
});

// ================================================================ ServerDecoder

function describeRequest(r: ClientRequest): string {
  const p = r.payload === undefined ? (r.type === P.NBD_CMD_WRITE ? ' skipped' : '') : ` ${r.payload.toString('hex')}`;
  return `request ${P.commandName(r.type)} flags=${r.flags} cookie=${r.cookie.toString(16)} ${r.offset}+${r.length}${p}`;
}

/**
 * Feed `pieces` to a ServerDecoder with a server that decides after each option: GO and
 * EXPORT_NAME enter transmission, anything else asks for the next option. `sync` answers inside
 * onOption; otherwise after push() returns (the decoder must hold early bytes meanwhile).
 */
function serverDecode(pieces: Buffer[], sync: boolean, opts?: ServerDecoderOptions): string[] {
  const events: string[] = [];
  let decision: (() => void) | undefined;
  let extended = false; // as a server that acknowledges NBD_OPT_EXTENDED_HEADERS
  const d: ServerDecoder = new ServerDecoder(
    {
      onClientFlags: (f) => events.push(`flags ${f}`),
      onOption: (o, data, length) => {
        events.push(`option ${o} ${data === undefined ? `skipped ${length}` : data.toString('hex')}`);
        if (o === P.NBD_OPT_EXTENDED_HEADERS) extended = true;
        const next = o === P.NBD_OPT_GO || o === P.NBD_OPT_EXPORT_NAME ? () => d.expectRequests(extended) : () => d.expectOption();
        if (sync) next();
        else decision = next;
      },
      onRequest: (r) => events.push(describeRequest(r)),
      onProtocolError: (e) => events.push(`error ${e.code} ${e.message}`),
    },
    opts,
  );
  for (const p of pieces) {
    d.push(p);
    while (decision) {
      const n = decision;
      decision = undefined;
      n();
    }
  }
  return events;
}

function serverDecodeAllSplits(input: Buffer, opts?: ServerDecoderOptions): string[] {
  const all = splits(input).flatMap((pieces) => [serverDecode(pieces, true, opts), serverDecode(pieces, false, opts)]);
  for (const r of all) expect(r).toEqual(all[0]);
  return all[0];
}

const session = Buffer.concat([
  encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES),
  encodeOption(P.NBD_OPT_STRUCTURED_REPLY),
  encodeMetaContext(P.NBD_OPT_SET_META_CONTEXT, '', ['base:allocation']),
  encodeGo('', [P.NBD_INFO_BLOCK_SIZE]),
  // requests sent right after GO: they must not be parsed as options
  encodeRequest(0, P.NBD_CMD_READ, 1, 0, 4096),
  encodeRequest(P.NBD_CMD_FLAG_FUA, P.NBD_CMD_WRITE, 2, 512, 3),
  Buffer.from('aabbcc', 'hex'),
  encodeRequest(P.NBD_CMD_FLAG_NO_HOLE, P.NBD_CMD_WRITE_ZEROES, 3, 2 ** 40, 2 ** 32 - 1),
  encodeRequest(0, P.NBD_CMD_WRITE, 4, 0, 0),
  encodeRequest(P.NBD_CMD_FLAG_REQ_ONE, P.NBD_CMD_BLOCK_STATUS, 0xffffffff, 0, 1 << 20),
  encodeRequest(0, P.NBD_CMD_DISC, 0, 0, 0),
]);

describe('ServerDecoder', () => {
  it('decodes a whole session — flags, options, requests, payloads — at every split, answering options at once or later', () => {
    expect(serverDecodeAllSplits(session)).toEqual([
      'flags 3',
      'option 8 ',
      `option 10 ${encodeMetaContext(P.NBD_OPT_SET_META_CONTEXT, '', ['base:allocation']).subarray(16).toString('hex')}`,
      'option 7 000000000001' + '0003',
      'request NBD_CMD_READ flags=0 cookie=1 0+4096',
      'request NBD_CMD_WRITE flags=1 cookie=2 512+3 aabbcc',
      'request NBD_CMD_WRITE_ZEROES flags=2 cookie=3 1099511627776+4294967295',
      'request NBD_CMD_WRITE flags=0 cookie=4 0+0 ',
      'request NBD_CMD_BLOCK_STATUS flags=8 cookie=ffffffff 0+1048576',
      'request NBD_CMD_DISC flags=0 cookie=0 0+0',
    ]);
  });

  it('enters transmission after EXPORT_NAME and keeps full 64-bit cookies and huge offsets', () => {
    const req = encodeRequest(0, P.NBD_CMD_READ, 5, 0, 1);
    req.writeUInt32BE(0x80000001, 8); // high half of the cookie
    req.writeUInt32BE(0x00300000, 16); // offset ≥ 2^53
    const input = Buffer.concat([encodeClientFlags(1), encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk')), req]);
    expect(serverDecodeAllSplits(input)).toEqual(['flags 1', `option 1 ${Buffer.from('disk').toString('hex')}`, 'request NBD_CMD_READ flags=0 cookie=8000000100000005 Infinity+1']);
  });

  it('skips oversized options and write payloads, and carries on', () => {
    const input = Buffer.concat([
      encodeClientFlags(1),
      encodeOption(P.NBD_OPT_LIST, Buffer.alloc(100, 1)),
      encodeOption(P.NBD_OPT_LIST, Buffer.alloc(8, 2)),
      encodeGo('', []),
      encodeRequest(0, P.NBD_CMD_WRITE, 1, 0, 64),
      Buffer.alloc(64, 7),
      encodeRequest(0, P.NBD_CMD_WRITE, 2, 0, 16),
      Buffer.alloc(16, 9),
    ]);
    expect(serverDecodeAllSplits(input, { maxOption: 50, maxPayload: 32 })).toEqual([
      'flags 1',
      'option 3 skipped 100',
      'option 3 0202020202020202',
      'option 7 000000000000',
      'request NBD_CMD_WRITE flags=0 cookie=1 0+64 skipped',
      `request NBD_CMD_WRITE flags=0 cookie=2 0+16 ${'09'.repeat(16)}`,
    ]);
  });

  it('reports a bad option magic once and ignores the rest', () => {
    const bad = encodeOption(P.NBD_OPT_GO);
    bad.writeUInt32BE(0x12345678, 0);
    const input = Buffer.concat([encodeClientFlags(1), encodeOption(P.NBD_OPT_STRUCTURED_REPLY), bad, encodeOption(P.NBD_OPT_ABORT)]);
    expect(serverDecodeAllSplits(input)).toEqual(['flags 1', 'option 8 ', 'error ERR_PROTOCOL bad option magic 0x12345678454f5054']);
  });

  it('reports a bad request magic once and ignores the rest', () => {
    const bad = encodeRequest(0, P.NBD_CMD_READ, 2, 0, 1);
    bad.writeUInt32BE(0x25609514, 0);
    const input = Buffer.concat([encodeClientFlags(1), encodeGo('', []), encodeRequest(0, P.NBD_CMD_FLUSH, 1, 0, 0), bad, encodeRequest(0, P.NBD_CMD_READ, 3, 0, 1)]);
    expect(serverDecodeAllSplits(input)).toEqual(['flags 1', 'option 7 000000000000', 'request NBD_CMD_FLUSH flags=0 cookie=1 0+0', 'error ERR_PROTOCOL bad request magic 0x25609514']);
  });

  it('fails a client that floods it while an option waits for its answer', () => {
    const events: string[] = [];
    const d = new ServerDecoder(
      {
        onClientFlags: () => undefined,
        onOption: (o) => events.push(`option ${o}`),
        onRequest: () => events.push('request'),
        onProtocolError: (e) => events.push(e.message),
      },
      { maxBuffered: 100 },
    );
    d.push(Buffer.concat([encodeClientFlags(1), encodeOption(P.NBD_OPT_LIST)]));
    expect(d.waiting).toBe(true);
    d.push(Buffer.alloc(60));
    expect(d.buffered).toBe(60);
    d.push(Buffer.alloc(60));
    expect(events).toEqual(['option 3', 'client sent 120 bytes without waiting for the reply to its option']);
    expect(d.stopped).toBe(true);
    d.expectOption(); // no effect once stopped
    d.push(encodeOption(P.NBD_OPT_LIST));
    expect(events.length).toBe(2);
  });

  it('pause() holds requests already received (even within one chunk) until resume()', () => {
    const events: string[] = [];
    const d: ServerDecoder = new ServerDecoder({
      onClientFlags: () => undefined,
      onOption: () => d.expectRequests(),
      onRequest: (r) => {
        events.push(describeRequest(r));
        if (r.cookie === 2n) d.pause(); // as the server does when a request takes it over its limits
      },
      onProtocolError: (e) => events.push(e.message),
    });
    const reqs = [1, 2, 3, 4].map((c) => encodeRequest(0, P.NBD_CMD_READ, c, 0, 512));
    d.push(Buffer.concat([encodeClientFlags(1), encodeGo('', []), ...reqs.slice(0, 3), reqs[3].subarray(0, 10)]));
    expect(events).toEqual(['request NBD_CMD_READ flags=0 cookie=1 0+512', 'request NBD_CMD_READ flags=0 cookie=2 0+512']);
    d.push(reqs[3].subarray(10));
    expect(events.length).toBe(2);
    d.resume();
    expect(events.slice(2)).toEqual(['request NBD_CMD_READ flags=0 cookie=3 0+512', 'request NBD_CMD_READ flags=0 cookie=4 0+512']);
    expect(d.idle).toBe(true);
  });

  it('hands over early bytes before a TLS upgrade, and ignores input after stop()', () => {
    const events: string[] = [];
    const d = new ServerDecoder({
      onClientFlags: () => undefined,
      onOption: (o) => events.push(`option ${o}`),
      onRequest: (r) => events.push(describeRequest(r)),
      onProtocolError: (e) => events.push(e.message),
    });
    d.push(Buffer.concat([encodeClientFlags(1), encodeOption(P.NBD_OPT_STARTTLS), Buffer.from('16030100', 'hex')]));
    expect(d.takeBuffered().toString('hex')).toBe('16030100');
    expect(d.buffered).toBe(0);
    d.expectOption();
    d.push(encodeGo('', []));
    d.expectRequests();
    expect(d.idle).toBe(true);
    d.push(encodeRequest(0, P.NBD_CMD_READ, 1, 0, 1).subarray(0, 5));
    expect(d.idle).toBe(false);
    d.stop();
    d.push(Buffer.alloc(100));
    expect(events).toEqual(['option 5', 'option 7']);
  });
});

// ================================================================ extended headers

describe('extended headers', () => {
  it('reply chunks re-framed with 32-byte headers decode with the client decoder at every split', () => {
    const input = Buffer.concat([
      toExtendedChunk(encodeOffsetHole(0, 1n, 4096, 4), 4096),
      toExtendedChunk(encodeOffsetDataHeader(0, 1n, 4100, 4), 4096),
      Buffer.from('aabbccdd', 'hex'),
      encodeBlockStatusExt(P.NBD_REPLY_FLAG_DONE, 5n, 2 ** 40, 1, [
        { length: 2 ** 40, flags: P.NBD_STATE_HOLE | P.NBD_STATE_ZERO },
        { length: 2 ** 41, flags: 0 },
      ]),
      toExtendedChunk(encodeNoneChunk(2n), 0),
      toExtendedChunk(encodeOffsetDataHeader(P.NBD_REPLY_FLAG_DONE, 1n, 4104, 4), 4096),
      Buffer.from('01020304', 'hex'),
      toExtendedChunk(encodeErrorChunk(4n, 5, 'bad sector', 2), 0),
    ]);
    expect(clientDecodeAllSplits(input, true, true)).toEqual({
      events: ['hole 1 4096+4', 'data 1 4100+4 aabbccdd', 'bs 5 1 1099511627776/3,2199023255552/0', 'done 5', 'done 2', 'data 1 4104+4 01020304', 'done 1', 'error 4 5 "bad sector" 2', 'done 4'],
      errors: [],
    });
  });

  it('headers: magic, flags, type, full cookie, request offset, 64-bit length', () => {
    expect(encodeExtendedChunkHeader(1, 6, 0xfedcba9876543210n, 2 ** 40, 2 ** 33).toString('hex')).toBe(
      '6e8a278c' + '0001' + '0006' + 'fedcba9876543210' + '0000010000000000' + '0000000200000000',
    );
    expect(toExtendedChunk(encodeOffsetHole(1, 7n, 2 ** 50, 512), 2 ** 50).toString('hex')).toBe(
      '6e8a278c' + '0001' + '0002' + '0000000000000007' + '0004000000000000' + '000000000000000c' + '0004000000000000' + '00000200',
    );
    expect(encodeBlockStatusExt(1, 3n, 0, 2, [{ length: 2 ** 42, flags: 3 }]).toString('hex')).toBe(
      '6e8a278c' + '0001' + '0006' + '0000000000000003' + '0000000000000000' + '0000000000000018' + '00000002' + '00000001' + '0000040000000000' + '0000000000000003',
    );
    // a simple reply (sent only to break the protocol on purpose) stays as it is
    const simple = encodeSimpleReply(1n, 0);
    expect(toExtendedChunk(simple, 0)).toBe(simple);
  });

  it('ServerDecoder reads 32-byte requests with 64-bit lengths after EXTENDED_HEADERS, at every split', () => {
    const input = Buffer.concat([
      encodeClientFlags(3),
      encodeOption(P.NBD_OPT_EXTENDED_HEADERS),
      encodeGo('', []),
      encodeExtendedRequest(P.NBD_CMD_FLAG_NO_HOLE, P.NBD_CMD_WRITE_ZEROES, 1, 0, 2 ** 40),
      encodeExtendedRequest(0, P.NBD_CMD_BLOCK_STATUS, 2, 2 ** 40, 2 ** 41),
      encodeExtendedRequest(P.NBD_CMD_FLAG_FUA, P.NBD_CMD_WRITE, 3, 512, 3),
      Buffer.from('aabbcc', 'hex'),
      encodeExtendedRequest(0, P.NBD_CMD_DISC, 0, 0, 0),
    ]);
    expect(serverDecodeAllSplits(input)).toEqual([
      'flags 3',
      'option 11 ',
      'option 7 000000000000',
      'request NBD_CMD_WRITE_ZEROES flags=2 cookie=1 0+1099511627776',
      'request NBD_CMD_BLOCK_STATUS flags=0 cookie=2 1099511627776+2199023255552',
      'request NBD_CMD_WRITE flags=1 cookie=3 512+3 aabbcc',
      'request NBD_CMD_DISC flags=0 cookie=0 0+0',
    ]);
  });

  it('ServerDecoder refuses the other request format and payloads beyond 32 bits', () => {
    const head = Buffer.concat([encodeClientFlags(3), encodeOption(P.NBD_OPT_EXTENDED_HEADERS), encodeGo('', [])]);
    expect(serverDecodeAllSplits(Buffer.concat([head, encodeRequest(0, P.NBD_CMD_READ, 1, 0, 512), Buffer.alloc(4)])).slice(3)).toEqual([
      'error ERR_PROTOCOL compact request after extended headers were negotiated 0x25609513',
    ]);
    const plain = Buffer.concat([encodeClientFlags(3), encodeGo('', [])]);
    expect(serverDecodeAllSplits(Buffer.concat([plain, encodeExtendedRequest(0, P.NBD_CMD_READ, 1, 0, 512)])).slice(2)).toEqual([
      'error ERR_PROTOCOL extended request but extended headers were not negotiated 0x21e41c71',
    ]);
    expect(serverDecodeAllSplits(Buffer.concat([head, encodeExtendedRequest(0, P.NBD_CMD_WRITE, 1, 0, 2 ** 32)])).slice(3)).toEqual([
      'error ERR_PROTOCOL NBD_CMD_WRITE with a payload of 4294967296 bytes',
    ]);
  });
});
