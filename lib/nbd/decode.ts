/**
 * Pure decoders: Buffers -> values. No I/O.
 *
 * Handshake messages are parsed by small functions over complete messages (the caller reads the
 * lengths they name). Transmission replies are parsed by ReplyDecoder, an incremental state
 * machine that never throws: malformed input becomes one coded protocol error, after which the
 * decoder ignores everything.
 */
import { NbdStreamError } from '../errors.js';
import {
  CLISERV_MAGIC,
  IHAVEOPT,
  NBDMAGIC,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_READ,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_FLAG_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REP_MAGIC,
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_EXTENDED_REPLY_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
  commandName,
} from './protocol.js';

const TWO_32 = 0x1_0000_0000;
/** Largest non-data structured chunk we accept (block status lists, error messages). */
export const MAX_CHUNK_BODY = 64 * 1024 * 1024;

function protocolError(message: string): NbdStreamError {
  return new NbdStreamError('ERR_PROTOCOL', message);
}

/** Read a 64-bit big-endian unsigned integer as a number; values above 2^53 give Infinity. */
export function readU64(buf: Buffer, pos: number): number {
  const hi = buf.readUInt32BE(pos);
  if (hi >= 0x200000) return Infinity;
  return hi * TWO_32 + buf.readUInt32BE(pos + 4);
}

/** Largest export size NBD allows (sizes are signed 64-bit in practice: libnbd and qemu refuse more). */
export const MAX_EXPORT_SIZE = 2n ** 63n - 1n;

/** An export size, exact; 2^63 or more is a protocol error. */
function readExportSize(buf: Buffer, pos: number): bigint {
  const size = buf.readBigUInt64BE(pos);
  if (size > MAX_EXPORT_SIZE) throw protocolError(`export size ${size} is larger than 2^63 - 1`);
  return size;
}

// ---------------------------------------------------------------- handshake

/** First 16 bytes from the server: NBDMAGIC then IHAVEOPT (newstyle). */
export function parseGreeting(buf: Buffer): void {
  if (buf.length < 16) throw protocolError('short greeting');
  if (buf.readBigUInt64BE(0) !== NBDMAGIC) throw protocolError('server did not send NBDMAGIC: not an NBD server');
  const m = buf.readBigUInt64BE(8);
  if (m === CLISERV_MAGIC) throw protocolError('server uses oldstyle negotiation, which is not supported');
  if (m !== IHAVEOPT) throw protocolError(`bad newstyle magic 0x${m.toString(16)}`);
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

/** 20-byte option reply header. */
export function parseOptionReplyHeader(buf: Buffer): OptionReplyHeader {
  if (buf.length < 20) throw protocolError('short option reply');
  const magic = buf.readBigUInt64BE(0);
  if (magic !== NBD_REP_MAGIC) throw protocolError(`bad option reply magic 0x${magic.toString(16)}`);
  return { option: buf.readUInt32BE(8), type: buf.readUInt32BE(12), length: buf.readUInt32BE(16) };
}

export type InfoReply =
  | { type: typeof NBD_INFO_EXPORT; size: bigint; flags: number }
  | { type: typeof NBD_INFO_BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: number };

/** Payload of NBD_REP_INFO. Unknown info types are returned with their type only. */
export function parseInfoReply(data: Buffer): InfoReply {
  if (data.length < 2) throw protocolError('short NBD_REP_INFO');
  const type = data.readUInt16BE(0);
  if (type === NBD_INFO_EXPORT) {
    if (data.length !== 12) throw protocolError(`NBD_INFO_EXPORT has length ${data.length}, expected 12`);
    return { type, size: readExportSize(data, 2), flags: data.readUInt16BE(10) };
  }
  if (type === NBD_INFO_BLOCK_SIZE) {
    if (data.length !== 14) throw protocolError(`NBD_INFO_BLOCK_SIZE has length ${data.length}, expected 14`);
    const minimum = data.readUInt32BE(2);
    const preferred = data.readUInt32BE(6);
    const maximum = data.readUInt32BE(10);
    const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
    if (!pow2(minimum) || minimum > 65536 || !pow2(preferred) || preferred < minimum || (maximum !== 0xffffffff && maximum % minimum !== 0) || maximum < minimum)
      throw protocolError(`invalid NBD_INFO_BLOCK_SIZE ${minimum}/${preferred}/${maximum}`);
    return { type, minimum, preferred, maximum };
  }
  return { type };
}

/** Payload of NBD_REP_META_CONTEXT: context id and name. */
export function parseMetaContextReply(data: Buffer): { id: number; name: string } {
  if (data.length < 4) throw protocolError('short NBD_REP_META_CONTEXT');
  return { id: data.readUInt32BE(0), name: data.subarray(4).toString('utf8') };
}

/** Reply to NBD_OPT_EXPORT_NAME: size and transmission flags (10 bytes, then 124 zeroes unless NO_ZEROES). */
export function parseExportNameReply(buf: Buffer): { size: bigint; flags: number } {
  if (buf.length < 10) throw protocolError('short NBD_OPT_EXPORT_NAME reply');
  return { size: readExportSize(buf, 0), flags: buf.readUInt16BE(8) };
}

// ---------------------------------------------------------------- transmission

/** What the decoder needs to know about a request to parse its reply. */
export interface PendingRequest {
  type: number;
  offset: number;
  length: number;
  /** Destination for read payloads; `length` bytes. */
  dest?: Buffer;
}

export interface Extent {
  length: number;
  flags: number;
}

/**
 * The all-zero blocks a reader found in a payload it checked as it arrived (the native reader,
 * -S): pairs (export offset, length), empty if none. Not given: the payload was not checked.
 */
export type ZeroRuns = Float64Array;

/** Events from ReplyDecoder. Cookies are the low 32 bits of the 64-bit cookie. */
export interface ReplyHandler {
  lookup(cookie: number): PendingRequest | undefined;
  /**
   * A simple reply; for a successful read the payload is already in dest. `zeroRuns`: from a
   * reader that checked the payload for all-zero blocks as it arrived (see ZeroRuns).
   */
  onSimpleReply(cookie: number, errno: number, zeroRuns?: ZeroRuns): void;
  /** OFFSET_DATA: `length` bytes at export offset `offset` are in dest (`zeroRuns` as above). */
  onData(cookie: number, offset: number, length: number, zeroRuns?: ZeroRuns): void;
  /** OFFSET_HOLE: `length` bytes at `offset` read as zero (dest untouched). */
  onHole(cookie: number, offset: number, length: number): void;
  onBlockStatus(cookie: number, contextId: number, extents: Extent[]): void;
  onError(cookie: number, errno: number, message: string, offset: number | undefined): void;
  /** The chunk just reported carried NBD_REPLY_FLAG_DONE (called after its own event). */
  onDone(cookie: number): void;
  onProtocolError(err: NbdStreamError): void;
}

/**
 * The byte ranges of one read reply received so far (OFFSET_DATA and OFFSET_HOLE chunks):
 * sorted, disjoint, touching ones merged. Chunks in order keep it one range long.
 */
class Received {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];

  /** Add [offset, offset+length); if it overlaps what was received, add nothing and return the first overlap. */
  add(offset: number, length: number): { offset: number; length: number } | undefined {
    const { starts, ends } = this;
    const end = offset + length;
    // first range that ends after offset
    let lo = 0;
    let hi = ends.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (ends[mid] <= offset) lo = mid + 1;
      else hi = mid;
    }
    if (lo < starts.length && starts[lo] < end) {
      const o = Math.max(offset, starts[lo]);
      return { offset: o, length: Math.min(end, ends[lo]) - o };
    }
    const joinsBefore = lo > 0 && ends[lo - 1] === offset;
    const joinsAfter = lo < starts.length && starts[lo] === end;
    if (joinsBefore && joinsAfter) {
      ends[lo - 1] = ends[lo];
      starts.splice(lo, 1);
      ends.splice(lo, 1);
    } else if (joinsBefore) ends[lo - 1] = end;
    else if (joinsAfter) starts[lo] = offset;
    else {
      starts.splice(lo, 0, offset);
      ends.splice(lo, 0, end);
    }
    return undefined;
  }
}

const S_HEADER = 0;
const S_SIMPLE_PAYLOAD = 1;
const S_CHUNK_REST = 2;
const S_DATA_PAYLOAD = 3;
const S_BODY = 4;
const S_DEAD = 5;
/** Extended headers: the 8-byte offset of an OFFSET_DATA chunk, after its 32-byte header. */
const S_EXT_DATA_OFFSET = 6;
/** Bytes read at once for a structured reply header: 20-byte chunk header + 8-byte offset. */
const HEADER_READ = 28;
/** The same with extended headers: 32-byte header + 8-byte offset. */
const EXT_HEADER_READ = 40;

/**
 * Incremental transmission-phase reply parser.
 *
 * Zero-copy use: ask nextBuffer() for the memory the next bytes belong in, let the socket read
 * into it, then call advance(n). Read payloads land directly in the request's dest buffer.
 * Copying use: push(chunk) with any split of the input.
 */
export class ReplyDecoder {
  private state = S_HEADER;
  private scratch = Buffer.allocUnsafe(4096);
  private need: number; // bytes the current unit needs in scratch
  private have = 0; // bytes of the current unit already in scratch
  private structured: boolean;
  /** Extended headers were negotiated: every reply is a 32-byte extended chunk header. */
  private readonly extended: boolean;
  private readonly handler: ReplyHandler;
  // current reply
  private cookie = 0;
  private flags = 0;
  private chunkType = 0;
  private chunkLength = 0;
  private req: PendingRequest | undefined;
  private dest: Buffer | undefined;
  private destPos = 0;
  private destEnd = 0;
  private dataOffset = 0;
  private readonly discard = Buffer.allocUnsafe(4096);
  /** Structured read replies with chunks received and no DONE yet, by cookie. */
  private readonly received = new Map<number, Received>();

  constructor(handler: ReplyHandler, structured: boolean, extended = false) {
    this.handler = handler;
    this.structured = structured || extended;
    this.extended = extended;
    this.need = extended ? NBD_EXTENDED_REPLY_SIZE : NBD_SIMPLE_REPLY_SIZE;
  }

  /** True between replies (no partial reply buffered). */
  get idle(): boolean {
    return this.state === S_HEADER && this.have === 0;
  }

  get dead(): boolean {
    return this.state === S_DEAD;
  }

  /** Memory where the next incoming bytes belong. Never empty. */
  nextBuffer(): Buffer {
    if (this.state === S_SIMPLE_PAYLOAD || this.state === S_DATA_PAYLOAD) return this.dest!.subarray(this.destPos, this.destEnd);
    if (this.state === S_DEAD) return this.discard;
    // With structured replies a header may be read together with what usually follows it
    // (rest of the chunk header and the OFFSET_DATA offset): one read instead of two.
    return this.scratch.subarray(this.have, this.state === S_HEADER && this.structured ? (this.extended ? EXT_HEADER_READ : HEADER_READ) : this.need);
  }

  /**
   * An OFFSET_DATA chunk was received elsewhere (the native reader checked its header and range
   * and put its payload in the request's dest): report it as if it had been parsed here.
   */
  dataReceived(cookie: number, offset: number, length: number, flags: number, zeroRuns?: ZeroRuns): void {
    if (!this.receivedElsewhere(cookie, 'data chunk')) return;
    const done = (flags & NBD_REPLY_FLAG_DONE) !== 0;
    if (!this.receive('OFFSET_DATA', cookie, offset, length, done)) return;
    this.handler.onData(cookie, offset, length, zeroRuns);
    if (done && this.state !== S_DEAD) this.handler.onDone(cookie);
  }

  /** A simple reply with its read payload was received elsewhere (see dataReceived). */
  simpleReadReceived(cookie: number, zeroRuns?: ZeroRuns): void {
    if (this.receivedElsewhere(cookie, 'read reply')) this.handler.onSimpleReply(cookie, 0, zeroRuns);
  }

  /** A reply part parsed elsewhere may be reported only between replies, for a pending read. */
  private receivedElsewhere(cookie: number, what: string): boolean {
    if (this.state === S_DEAD) return false;
    if (this.idle && this.handler.lookup(cookie)?.type === NBD_CMD_READ) return true;
    this.fail(`${what} for cookie ${cookie} out of place`);
    return false;
  }

  /**
   * Note a read reply's OFFSET_DATA or OFFSET_HOLE chunk (already checked to lie inside the
   * request). A chunk that overlaps one received before for the same reply is a protocol error
   * (false): counting bytes alone would let a repeated chunk stand in for a missing one.
   */
  private receive(what: string, cookie: number, offset: number, length: number, done: boolean): boolean {
    let r = this.received.get(cookie);
    if (!r) {
      if (done) return true; // the reply's only chunk
      this.received.set(cookie, (r = new Received()));
    }
    const overlap = r.add(offset, length);
    if (overlap) {
      const req = this.handler.lookup(cookie)!;
      this.fail(`${what} chunk ${offset}+${length} overlaps ${overlap.offset}+${overlap.length} already received for the read ${req.offset}+${req.length}`);
      return false;
    }
    if (done) this.received.delete(cookie);
    return true;
  }

  /** The reply for cookie ended (NBD_REPLY_FLAG_DONE): forget what it received. */
  private replyDone(cookie: number): void {
    this.received.delete(cookie);
    this.handler.onDone(cookie);
  }

  /** `n` bytes were written at the start of the buffer last returned by nextBuffer(). */
  advance(n: number): void {
    switch (this.state) {
      case S_SIMPLE_PAYLOAD:
      case S_DATA_PAYLOAD:
        this.destPos += n;
        if (this.destPos === this.destEnd) this.payloadDone();
        return;
      case S_DEAD:
        return;
      default: {
        this.have += n;
        if (this.have < this.need) return;
        // bytes past this unit belong to what comes next: fed on after the state changes
        const extra = this.have > this.need ? Buffer.from(this.scratch.subarray(this.need, this.have)) : undefined;
        this.have = 0;
        this.unitDone();
        if (extra) this.push(extra);
      }
    }
  }

  /** Feed bytes by copying (TLS sockets, tests). */
  push(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length) {
      const b = this.nextBuffer();
      const n = Math.min(b.length, chunk.length - pos);
      chunk.copy(b, 0, pos, pos + n);
      pos += n;
      this.advance(n);
    }
  }

  /** Stop decoding with a protocol error (also used by the connection for EOF mid-reply). */
  fail(message: string): void {
    if (this.state === S_DEAD) return;
    this.state = S_DEAD;
    this.handler.onProtocolError(protocolError(message));
  }

  private expect(state: number, bytes: number): void {
    this.state = state;
    this.need = bytes;
    this.have = 0;
    if (bytes > this.scratch.length) this.scratch = Buffer.allocUnsafe(bytes);
  }

  private toHeader(): void {
    this.expect(S_HEADER, this.extended ? NBD_EXTENDED_REPLY_SIZE : NBD_SIMPLE_REPLY_SIZE);
  }

  private unitDone(): void {
    const s = this.scratch;
    switch (this.state) {
      case S_HEADER:
        return this.headerDone();
      case S_CHUNK_REST: {
        this.chunkLength = s.readUInt32BE(0);
        if (this.chunkType !== NBD_REPLY_TYPE_OFFSET_DATA) return this.chunkHeaderDone();
        const req = this.req!;
        const len = this.chunkLength - 8;
        if (req.type !== NBD_CMD_READ) return this.fail(`OFFSET_DATA chunk in reply to ${commandName(req.type)}`);
        if (len <= 0) return this.fail(`OFFSET_DATA chunk with length ${this.chunkLength}`);
        return this.startData(readU64(s, 4), len);
      }
      case S_BODY:
        return this.bodyDone();
      case S_EXT_DATA_OFFSET:
        return this.startData(readU64(s, 0), this.chunkLength - 8);
    }
  }

  /**
   * The first 16 bytes of a reply: a whole simple reply, or a structured chunk header up to its
   * length field (magic, flags, type, cookie). The rest of a chunk header is read next, together
   * with the offset of an OFFSET_DATA chunk, so that its payload can go straight to its buffer.
   */
  private headerDone(): void {
    const s = this.scratch;
    const magic = s.readUInt32BE(0);
    if (this.extended || magic === NBD_EXTENDED_REPLY_MAGIC) return this.extendedHeaderDone();
    if (magic !== NBD_SIMPLE_REPLY_MAGIC && magic !== NBD_STRUCTURED_REPLY_MAGIC) return this.fail(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
    if (magic === NBD_STRUCTURED_REPLY_MAGIC && !this.structured) return this.fail('structured reply received but structured replies were not negotiated');
    const req = this.replyTo();
    if (!req) return;
    const cookie = this.cookie;
    if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      this.flags = s.readUInt16BE(4);
      this.chunkType = s.readUInt16BE(6);
      this.expect(S_CHUNK_REST, this.chunkType === NBD_REPLY_TYPE_OFFSET_DATA ? 12 : 4);
      return;
    }
    const errno = s.readUInt32BE(4);
    if (this.structured && (req.type === NBD_CMD_READ || (req.type === NBD_CMD_BLOCK_STATUS && errno === 0)))
      return this.fail(`simple reply to ${commandName(req.type)} after structured replies were negotiated`);
    if (errno === 0 && req.type === NBD_CMD_READ && req.length > 0) {
      this.dest = req.dest!;
      this.destPos = 0;
      this.destEnd = req.length;
      this.state = S_SIMPLE_PAYLOAD;
      return;
    }
    this.toHeader();
    this.handler.onSimpleReply(cookie, errno);
  }

  /** The pending request a reply header (in scratch) names by its cookie; fails the stream if none. */
  private replyTo(): PendingRequest | undefined {
    const s = this.scratch;
    const hi = s.readUInt32BE(8);
    const cookie = s.readUInt32BE(12);
    const req = hi === 0 ? this.handler.lookup(cookie) : undefined;
    if (!req) {
      this.fail(`reply for unknown cookie 0x${hi.toString(16)}${cookie.toString(16).padStart(8, '0')}`);
      return undefined;
    }
    this.cookie = cookie;
    this.req = req;
    return req;
  }

  /**
   * A 32-byte extended reply header (magic, flags, type, cookie, the request's offset, 64-bit
   * payload length). OFFSET_DATA reads its 8-byte offset next, so that its data goes straight to
   * its buffer; other chunks go on as structured chunks.
   */
  private extendedHeaderDone(): void {
    const s = this.scratch;
    const magic = s.readUInt32BE(0);
    if (!this.extended) return this.fail('extended reply received but extended headers were not negotiated');
    if (magic !== NBD_EXTENDED_REPLY_MAGIC) {
      const kind = magic === NBD_SIMPLE_REPLY_MAGIC ? 'simple reply' : magic === NBD_STRUCTURED_REPLY_MAGIC ? 'structured reply' : `reply magic 0x${magic.toString(16).padStart(8, '0')}`;
      return this.fail(`${kind} received after extended headers were negotiated`);
    }
    const req = this.replyTo();
    if (!req) return;
    this.flags = s.readUInt16BE(4);
    this.chunkType = s.readUInt16BE(6);
    this.chunkLength = readU64(s, 24);
    if (this.chunkType === NBD_REPLY_TYPE_BLOCK_STATUS) return this.fail('BLOCK_STATUS chunk received after extended headers were negotiated (BLOCK_STATUS_EXT expected)');
    if (this.chunkType === NBD_REPLY_TYPE_BLOCK_STATUS_EXT && req.type !== NBD_CMD_BLOCK_STATUS) return this.fail(`BLOCK_STATUS_EXT chunk in reply to ${commandName(req.type)}`);
    if (this.chunkType !== NBD_REPLY_TYPE_OFFSET_DATA) return this.chunkHeaderDone();
    if (req.type !== NBD_CMD_READ) return this.fail(`OFFSET_DATA chunk in reply to ${commandName(req.type)}`);
    if (!(this.chunkLength > 8 && this.chunkLength - 8 <= req.length)) return this.fail(`OFFSET_DATA chunk with length ${this.chunkLength}`);
    this.expect(S_EXT_DATA_OFFSET, 8);
  }

  /** The payload of an OFFSET_DATA chunk of a read: `len` bytes at export offset `offset`. */
  private startData(offset: number, len: number): void {
    const req = this.req!;
    if (offset < req.offset || offset + len > req.offset + req.length)
      return this.fail(`OFFSET_DATA chunk ${offset}+${len} outside the request ${req.offset}+${req.length}`);
    // checked before the payload lands: a repeated chunk never overwrites the first
    if (!this.receive('OFFSET_DATA', this.cookie, offset, len, (this.flags & NBD_REPLY_FLAG_DONE) !== 0)) return;
    this.dataOffset = offset;
    this.dest = req.dest!;
    this.destPos = offset - req.offset;
    this.destEnd = this.destPos + len;
    this.state = S_DATA_PAYLOAD;
  }

  private chunkHeaderDone(): void {
    const { chunkType: type, chunkLength: len, req } = this;
    const cmd = commandName(req!.type);
    if (type === NBD_REPLY_TYPE_NONE) {
      if (len !== 0) return this.fail(`NBD_REPLY_TYPE_NONE with length ${len}`);
      if (!(this.flags & NBD_REPLY_FLAG_DONE)) return this.fail('NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE');
      this.toHeader();
      this.replyDone(this.cookie);
      return;
    }
    if (type === NBD_REPLY_TYPE_OFFSET_HOLE && req!.type !== NBD_CMD_READ) return this.fail(`OFFSET_HOLE chunk in reply to ${cmd}`);
    if (type === NBD_REPLY_TYPE_BLOCK_STATUS && req!.type !== NBD_CMD_BLOCK_STATUS) return this.fail(`BLOCK_STATUS chunk in reply to ${cmd}`);
    if (len > MAX_CHUNK_BODY) return this.fail(`structured reply chunk of ${len} bytes is too large`);
    if (len === 0) {
      this.need = 0;
      return this.bodyDone();
    }
    this.expect(S_BODY, len);
  }

  private bodyDone(): void {
    const s = this.scratch;
    const len = this.chunkLength;
    const cookie = this.cookie;
    const req = this.req!;
    const type = this.chunkType;
    const done = (this.flags & NBD_REPLY_FLAG_DONE) !== 0;
    this.toHeader();
    switch (type) {
      case NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (len !== 12) return this.fail(`OFFSET_HOLE chunk with length ${len}`);
        const offset = readU64(s, 0);
        const holeLen = s.readUInt32BE(8);
        if (holeLen === 0) return this.fail('OFFSET_HOLE chunk with zero length');
        if (offset < req.offset || offset + holeLen > req.offset + req.length)
          return this.fail(`OFFSET_HOLE chunk ${offset}+${holeLen} outside the request ${req.offset}+${req.length}`);
        if (!this.receive('OFFSET_HOLE', cookie, offset, holeLen, done)) return;
        this.handler.onHole(cookie, offset, holeLen);
        break;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (len < 12 || (len - 4) % 8 !== 0) return this.fail(`BLOCK_STATUS chunk with length ${len}`);
        const id = s.readUInt32BE(0);
        const extents: Extent[] = [];
        for (let p = 4; p < len; p += 8) extents.push({ length: s.readUInt32BE(p), flags: s.readUInt32BE(p + 4) });
        this.handler.onBlockStatus(cookie, id, extents);
        break;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS_EXT: {
        // only reached with extended headers (extendedHeaderDone); 64-bit (length, status) pairs
        if (!this.extended) return this.fail(`unknown structured reply chunk type ${type}`);
        if (len < 24 || (len - 8) % 16 !== 0) return this.fail(`BLOCK_STATUS_EXT chunk with length ${len}`);
        const id = s.readUInt32BE(0);
        const count = s.readUInt32BE(4);
        if (count !== (len - 8) / 16) return this.fail(`BLOCK_STATUS_EXT chunk of ${len} bytes with ${count} descriptors`);
        const extents: Extent[] = [];
        for (let p = 8; p < len; p += 16) {
          if (s.readUInt32BE(p + 8) !== 0) return this.fail(`BLOCK_STATUS_EXT descriptor with status 0x${s.readBigUInt64BE(p + 8).toString(16)}`);
          extents.push({ length: readU64(s, p), flags: s.readUInt32BE(p + 12) });
        }
        this.handler.onBlockStatus(cookie, id, extents);
        break;
      }
      default: {
        if (!(type & NBD_REPLY_TYPE_FLAG_ERROR)) return this.fail(`unknown structured reply chunk type ${type}`);
        if (len < 6) return this.fail(`error chunk with length ${len}`);
        const errno = s.readUInt32BE(0);
        const msgLen = s.readUInt16BE(4);
        let offset: number | undefined;
        if (type === NBD_REPLY_TYPE_ERROR_OFFSET) {
          if (len !== 6 + msgLen + 8) return this.fail(`ERROR_OFFSET chunk length ${len} does not match its message length ${msgLen}`);
          offset = readU64(s, 6 + msgLen);
          if (offset < req.offset || offset >= req.offset + Math.max(req.length, 1))
            return this.fail(`ERROR_OFFSET ${offset} outside the request ${req.offset}+${req.length}`);
        } else if (6 + msgLen > len || (type === NBD_REPLY_TYPE_ERROR && 6 + msgLen !== len)) {
          return this.fail(`error chunk length ${len} does not match its message length ${msgLen}`);
        }
        if (errno === 0) return this.fail('error chunk with error value 0');
        this.handler.onError(cookie, errno, s.toString('utf8', 6, 6 + msgLen), offset);
      }
    }
    if (done && this.state !== S_DEAD) this.replyDone(cookie);
  }

  private payloadDone(): void {
    const cookie = this.cookie;
    if (this.state === S_SIMPLE_PAYLOAD) {
      this.toHeader();
      this.handler.onSimpleReply(cookie, 0);
      return;
    }
    const done = (this.flags & NBD_REPLY_FLAG_DONE) !== 0;
    const offset = this.dataOffset;
    const len = this.chunkLength - 8;
    this.toHeader();
    this.handler.onData(cookie, offset, len);
    if (done && this.state !== S_DEAD) this.handler.onDone(cookie); // its range was noted with its header
  }
}
