/**
 * Server side of the NBD wire format, pure (no I/O): encoders for everything a server sends
 * (greeting, option replies, export infos, simple replies, structured reply chunks) and an
 * incremental decoder for everything a client sends (client flags, options, requests with their
 * write payloads).
 *
 * ServerDecoder never throws: malformed input becomes one coded ERR_PROTOCOL error, after which it
 * ignores everything. In the handshake it stops after each option until the server says what
 * comes next (another option, or transmission requests after NBD_OPT_GO / NBD_OPT_EXPORT_NAME),
 * so bytes that arrive early are never parsed in the wrong phase.
 *
 * Cookies are the full 64-bit field (bigint): a server must echo whatever the client sent.
 *
 * Extended headers (NBD_OPT_EXTENDED_HEADERS): requests are 32 bytes with a 64-bit length
 * (ServerDecoder.expectRequests(true)); every reply is a chunk with a 32-byte header: chunks are
 * encoded as structured chunks and re-framed by toExtendedChunk, except block status, which has
 * its own 64-bit chunk (encodeBlockStatusExt).
 */
import { NbdStreamError } from '../errors.js';
import { readU64 } from './decode.js';
import { writeU64 } from './encode.js';
import {
  IHAVEOPT,
  NBDMAGIC,
  NBD_CMD_WRITE,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAX_STRING,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REP_MAGIC,
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_EXTENDED_REPLY_SIZE,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_EXTENDED_REQUEST_SIZE,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from './protocol.js';

function protocolError(message: string): NbdStreamError {
  return new NbdStreamError('ERR_PROTOCOL', message);
}

// ================================================================ encoders: handshake

/** NBDMAGIC, IHAVEOPT and the 16-bit handshake flags (18 bytes). */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** An option reply: magic, option, reply type, length, data. */
export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(20 + data.length);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

/** UTF-8 bytes of a protocol string, cut at NBD_MAX_STRING bytes on a character boundary. */
export function protocolString(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length <= NBD_MAX_STRING) return b;
  let end = NBD_MAX_STRING;
  while (end > 0 && (b[end] & 0xc0) === 0x80) end--; // do not split a multi-byte character
  return b.subarray(0, end);
}

/** An option error reply carrying a human-readable message. */
export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, protocolString(message));
}

/** NBD_REP_INFO data for NBD_INFO_EXPORT: size and transmission flags. */
export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO_EXPORT, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

/** NBD_REP_INFO data for NBD_INFO_BLOCK_SIZE. */
export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

/** NBD_REP_INFO data for NBD_INFO_NAME or NBD_INFO_DESCRIPTION: type, then the string. */
export function encodeInfoString(type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION, s: string): Buffer {
  const text = protocolString(s);
  const b = Buffer.allocUnsafe(2 + text.length);
  b.writeUInt16BE(type, 0);
  text.copy(b, 2);
  return b;
}

/** NBD_REP_SERVER data (reply to NBD_OPT_LIST): name length, name, then the description. */
export function encodeRepServer(name: string, description = ''): Buffer {
  const n = protocolString(name);
  const d = protocolString(description);
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** NBD_REP_META_CONTEXT data: context id, then its name. */
export function encodeRepMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id >>> 0, 0);
  n.copy(b, 4);
  return b;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeroes unless NO_ZEROES was agreed. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  writeU64(b, size, 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

// ================================================================ encoders: transmission

/** Simple reply header (16 bytes); a successful read's payload follows it. */
export function encodeSimpleReply(cookie: bigint, errno: number): Buffer {
  const b = Buffer.allocUnsafe(16);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(errno >>> 0, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

/** Structured reply chunk header (20 bytes); `length` payload bytes follow. */
export function encodeChunkHeader(flags: number, type: number, cookie: bigint, length: number, into?: Buffer): Buffer {
  const b = into ?? Buffer.allocUnsafe(20);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length >>> 0, 16);
  return b;
}

/**
 * NBD_REPLY_TYPE_OFFSET_DATA up to its data: chunk header and offset (28 bytes). The `dataLength`
 * bytes of data are sent after it (kept separate so they are never copied).
 */
export function encodeOffsetDataHeader(flags: number, cookie: bigint, offset: number, dataLength: number): Buffer {
  const b = Buffer.allocUnsafe(28);
  encodeChunkHeader(flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + dataLength, b);
  writeU64(b, offset, 20);
  return b;
}

/** NBD_REPLY_TYPE_OFFSET_HOLE: `length` bytes at `offset` read as zeroes (32 bytes). */
export function encodeOffsetHole(flags: number, cookie: bigint, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(32);
  encodeChunkHeader(flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12, b);
  writeU64(b, offset, 20);
  b.writeUInt32BE(length >>> 0, 28);
  return b;
}

export interface BlockDescriptor {
  length: number;
  /** Status flags of the context (base:allocation: NBD_STATE_HOLE | NBD_STATE_ZERO). */
  flags: number;
}

/** NBD_REPLY_TYPE_BLOCK_STATUS for one context: id, then (length, status) descriptors. */
export function encodeBlockStatus(flags: number, cookie: bigint, contextId: number, extents: BlockDescriptor[]): Buffer {
  const len = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(20 + len);
  encodeChunkHeader(flags, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, len, b);
  b.writeUInt32BE(contextId >>> 0, 20);
  let p = 24;
  for (const e of extents) {
    b.writeUInt32BE(e.length >>> 0, p);
    b.writeUInt32BE(e.flags >>> 0, p + 4);
    p += 8;
  }
  return b;
}

/**
 * NBD_REPLY_TYPE_ERROR (or NBD_REPLY_TYPE_ERROR_OFFSET when `offset` is given): error value and
 * a message (cut to NBD_MAX_STRING bytes). DONE by default.
 */
export function encodeErrorChunk(cookie: bigint, errno: number, message: string, offset?: number, flags = NBD_REPLY_FLAG_DONE): Buffer {
  const msg = protocolString(message);
  const len = 6 + msg.length + (offset === undefined ? 0 : 8);
  const b = Buffer.allocUnsafe(20 + len);
  encodeChunkHeader(flags, offset === undefined ? NBD_REPLY_TYPE_ERROR : NBD_REPLY_TYPE_ERROR_OFFSET, cookie, len, b);
  b.writeUInt32BE(errno >>> 0, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  if (offset !== undefined) writeU64(b, offset, 26 + msg.length);
  return b;
}

/**
 * Extended reply header (32 bytes): magic, flags, type, cookie, the request's offset, and the
 * 64-bit length of the payload that follows.
 */
export function encodeExtendedChunkHeader(flags: number, type: number, cookie: bigint, offset: number, length: number, into?: Buffer): Buffer {
  const b = into ?? Buffer.allocUnsafe(NBD_EXTENDED_REPLY_SIZE);
  b.writeUInt32BE(NBD_EXTENDED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  writeU64(b, offset, 16);
  writeU64(b, length, 24);
  return b;
}

/**
 * A structured chunk (20-byte header and what follows it in the same buffer) re-framed with the
 * extended header; `offset` is the request's. Anything else (an extended chunk already, or a
 * simple reply sent on purpose to break the protocol) is returned as it is.
 */
export function toExtendedChunk(head: Buffer, offset: number): Buffer {
  if (head.length < 20 || head.readUInt32BE(0) !== NBD_STRUCTURED_REPLY_MAGIC) return head;
  const b = Buffer.allocUnsafe(head.length + 12);
  encodeExtendedChunkHeader(head.readUInt16BE(4), head.readUInt16BE(6), head.readBigUInt64BE(8), offset, head.readUInt32BE(16), b);
  head.copy(b, NBD_EXTENDED_REPLY_SIZE, 20);
  return b;
}

/** NBD_REPLY_TYPE_BLOCK_STATUS_EXT for one context: id, count, then 64-bit (length, status) descriptors. */
export function encodeBlockStatusExt(flags: number, cookie: bigint, offset: number, contextId: number, extents: BlockDescriptor[]): Buffer {
  const len = 8 + 16 * extents.length;
  const b = Buffer.allocUnsafe(NBD_EXTENDED_REPLY_SIZE + len);
  encodeExtendedChunkHeader(flags, NBD_REPLY_TYPE_BLOCK_STATUS_EXT, cookie, offset, len, b);
  b.writeUInt32BE(contextId >>> 0, 32);
  b.writeUInt32BE(extents.length, 36);
  let p = 40;
  for (const e of extents) {
    writeU64(b, e.length, p);
    b.writeUInt32BE(0, p + 8);
    b.writeUInt32BE(e.flags >>> 0, p + 12);
    p += 16;
  }
  return b;
}

/** NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE: "nothing more for this cookie". */
export function encodeNoneChunk(cookie: bigint): Buffer {
  return encodeChunkHeader(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
}

// ================================================================ option data parsers

function readString(data: Buffer, pos: number, what: string): { value: string; next: number } {
  if (pos + 4 > data.length) throw protocolError(`${what}: length field past the end of the option data`);
  const len = data.readUInt32BE(pos);
  if (len > NBD_MAX_STRING) throw protocolError(`${what} is ${len} bytes long (at most ${NBD_MAX_STRING})`);
  if (pos + 4 + len > data.length) throw protocolError(`${what} runs past the end of the option data`);
  const value = data.toString('utf8', pos + 4, pos + 4 + len);
  if (value.includes('\0')) throw protocolError(`${what} contains NUL`);
  return { value, next: pos + 4 + len };
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO: export name and requested NBD_INFO_* types. Throws ERR_PROTOCOL when malformed. */
export function parseGoData(data: Buffer): { name: string; infos: number[] } {
  const { value: name, next } = readString(data, 0, 'export name');
  if (next + 2 > data.length) throw protocolError('information request count missing');
  const n = data.readUInt16BE(next);
  if (next + 2 + 2 * n !== data.length) throw protocolError(`option data length ${data.length} does not match ${n} information requests`);
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(data.readUInt16BE(next + 2 + 2 * i));
  return { name, infos };
}

/** Data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT. Throws ERR_PROTOCOL when malformed. */
export function parseMetaContextData(data: Buffer): { name: string; queries: string[] } {
  const { value: name, next } = readString(data, 0, 'export name');
  if (next + 4 > data.length) throw protocolError('query count missing');
  const n = data.readUInt32BE(next);
  const queries: string[] = [];
  let pos = next + 4;
  for (let i = 0; i < n; i++) {
    const q = readString(data, pos, `query ${i}`);
    queries.push(q.value);
    pos = q.next;
  }
  if (pos !== data.length) throw protocolError(`${data.length - pos} bytes after the last query`);
  return { name, queries };
}

/** Data of NBD_OPT_EXPORT_NAME: the whole data is the name. */
export function parseExportNameData(data: Buffer): string {
  if (data.length > NBD_MAX_STRING) throw protocolError(`export name is ${data.length} bytes long (at most ${NBD_MAX_STRING})`);
  const name = data.toString('utf8');
  if (name.includes('\0')) throw protocolError('export name contains NUL');
  return name;
}

// ================================================================ decoder

export interface ClientRequest {
  /** Command flags (NBD_CMD_FLAG_*). */
  flags: number;
  /** Command type (NBD_CMD_*). */
  type: number;
  cookie: bigint;
  /** Infinity when the client sent an offset ≥ 2^53 (out of range for any export). */
  offset: number;
  length: number;
  /**
   * NBD_CMD_WRITE: the data. Undefined when the length exceeded the decoder's maxPayload: the
   * bytes were skipped, and the server answers with an error.
   */
  payload?: Buffer;
}

export interface ServerDecoderHandler {
  /** The client's 32-bit flags (NBD_FLAG_C_*). */
  onClientFlags(flags: number): void;
  /**
   * An option. `data` is undefined when it was longer than maxOption (the bytes were skipped;
   * answer NBD_REP_ERR_TOO_BIG). The decoder then waits for expectOption() or expectRequests().
   */
  onOption(option: number, data: Buffer | undefined, length: number): void;
  onRequest(req: ClientRequest): void;
  onProtocolError(err: NbdStreamError): void;
}

export interface ServerDecoderOptions {
  /** Longest option data kept (default 64 KiB); longer options are skipped. */
  maxOption?: number;
  /** Longest NBD_CMD_WRITE payload kept (default 32 MiB); longer payloads are skipped. */
  maxPayload?: number;
  /** Most bytes buffered while waiting for the server to answer an option (default 1 MiB + maxPayload). */
  maxBuffered?: number;
}

const ST_FLAGS = 0;
const ST_OPTION_HEADER = 1;
const ST_OPTION_DATA = 2;
const ST_WAIT = 3; // an option was delivered; the server has not said what comes next
const ST_REQUEST = 4;
const ST_PAYLOAD = 5;
const ST_STOPPED = 6; // after NBD_CMD_DISC or a protocol error: input is ignored

/**
 * Incremental parser of client traffic. Feed it with push(chunk) at any split. Phases: 4 bytes of
 * client flags, then options (each followed by a wait for expectOption()/expectRequests()), then
 * 28-byte requests (32 with extended headers), each NBD_CMD_WRITE followed by its payload.
 */
export class ServerDecoder {
  private state = ST_FLAGS;
  private readonly handler: ServerDecoderHandler;
  private readonly maxOption: number;
  private readonly maxPayload: number;
  private readonly maxBuffered: number;
  private head = Buffer.allocUnsafe(NBD_EXTENDED_REQUEST_SIZE);
  /** Requests are extended (32 bytes, 64-bit length). */
  private extended = false;
  private have = 0;
  private need = 4;
  // current option or request
  private option = 0;
  private req: ClientRequest | undefined;
  private body: Buffer | undefined; // option data or write payload being filled (undefined: skipping)
  private bodyPos = 0;
  private bodyLen = 0;
  /** Input not parsed yet: received while waiting after an option, or not reached yet. */
  private queued: Buffer[] = [];
  private queuedBytes = 0;
  private busy = false;
  private paused = false;

  constructor(handler: ServerDecoderHandler, opts: ServerDecoderOptions = {}) {
    this.handler = handler;
    this.maxOption = opts.maxOption ?? 64 * 1024;
    this.maxPayload = opts.maxPayload ?? 32 * 1024 * 1024;
    this.maxBuffered = opts.maxBuffered ?? 1024 * 1024 + this.maxPayload;
  }

  /** True after a protocol error or stop(). */
  get stopped(): boolean {
    return this.state === ST_STOPPED;
  }

  /** True while an option is waiting for the server's decision. */
  get waiting(): boolean {
    return this.state === ST_WAIT;
  }

  /** Bytes received but not yet parsed (while waiting after an option). */
  get buffered(): number {
    return this.queuedBytes;
  }

  /** True in the transmission phase between requests (no partial request buffered). */
  get idle(): boolean {
    return this.state === ST_REQUEST && this.have === 0 && this.queuedBytes === 0;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0 || this.state === ST_STOPPED) return;
    this.queued.push(chunk);
    this.queuedBytes += chunk.length;
    this.pump();
  }

  /** Parse the next option (after answering the last one). */
  expectOption(): void {
    this.continueWith(ST_OPTION_HEADER, 16);
  }

  /** Enter the transmission phase: parse requests (`extended`: 32-byte extended requests). */
  expectRequests(extended = false): void {
    if (this.state !== ST_WAIT) return;
    this.extended = extended;
    this.continueWith(ST_REQUEST, this.requestSize);
  }

  private get requestSize(): number {
    return this.extended ? NBD_EXTENDED_REQUEST_SIZE : NBD_REQUEST_SIZE;
  }

  /**
   * Deliver nothing more until resume(), even from input already pushed (one chunk can hold
   * thousands of requests). Takes effect after the request or option being delivered now.
   */
  pause(): void {
    this.paused = true;
  }

  /** Deliver again, starting with the input held while paused. */
  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.pump();
  }

  /** Take (and forget) the bytes queued while waiting: used before a TLS upgrade, where there must be none. */
  takeBuffered(): Buffer {
    const b = Buffer.concat(this.queued);
    this.queued = [];
    this.queuedBytes = 0;
    return b;
  }

  /** Ignore all further input (after NBD_CMD_DISC). */
  stop(): void {
    this.state = ST_STOPPED;
    this.queued = [];
    this.queuedBytes = 0;
  }

  /** Stop with a protocol error (reported once). */
  fail(message: string): void {
    if (this.state === ST_STOPPED) return;
    this.stop();
    this.handler.onProtocolError(protocolError(message));
  }

  private continueWith(state: number, need: number): void {
    if (this.state !== ST_WAIT) return; // only meaningful after an option
    this.state = state;
    this.need = need;
    this.have = 0;
    this.pump();
  }

  /**
   * Parse queued input until it runs out or an option makes us wait. Re-entrant calls (a handler
   * answering an option synchronously) only change the state; the outer loop carries on.
   */
  private pump(): void {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.queued.length && !this.paused && this.state !== ST_WAIT && this.state !== ST_STOPPED) {
        const c = this.queued.shift()!;
        this.queuedBytes -= c.length;
        const rest = this.consume(c);
        if (rest && this.state !== ST_STOPPED) {
          this.queued.unshift(rest);
          this.queuedBytes += rest.length;
        }
      }
    } finally {
      this.busy = false;
    }
    if (this.state === ST_WAIT && this.queuedBytes > this.maxBuffered)
      this.fail(`client sent ${this.queuedBytes} bytes without waiting for the reply to its option`);
  }

  /** Parse `chunk`; returns what is left unparsed when the decoder starts waiting or is paused. */
  private consume(chunk: Buffer): Buffer | undefined {
    let pos = 0;
    while (pos < chunk.length) {
      if (this.paused) return chunk.subarray(pos);
      switch (this.state) {
        case ST_WAIT:
          return chunk.subarray(pos);
        case ST_STOPPED:
          return undefined;
        case ST_OPTION_DATA:
        case ST_PAYLOAD: {
          const n = Math.min(this.bodyLen - this.bodyPos, chunk.length - pos);
          if (this.body) chunk.copy(this.body, this.bodyPos, pos, pos + n);
          this.bodyPos += n;
          pos += n;
          if (this.bodyPos === this.bodyLen) this.bodyDone();
          break;
        }
        default: {
          const n = Math.min(this.need - this.have, chunk.length - pos);
          chunk.copy(this.head, this.have, pos, pos + n);
          this.have += n;
          pos += n;
          if (this.have === this.need) {
            this.have = 0;
            this.headDone();
          }
        }
      }
    }
    return undefined;
  }

  private startBody(state: number, length: number, keep: boolean): void {
    this.state = state;
    this.bodyLen = length;
    this.bodyPos = 0;
    this.body = keep ? Buffer.allocUnsafe(length) : undefined;
    if (length === 0) this.bodyDone();
  }

  private headDone(): void {
    const h = this.head;
    switch (this.state) {
      case ST_FLAGS: {
        this.state = ST_OPTION_HEADER;
        this.need = 16;
        this.handler.onClientFlags(h.readUInt32BE(0));
        return;
      }
      case ST_OPTION_HEADER: {
        const magic = h.readBigUInt64BE(0);
        if (magic !== IHAVEOPT) return this.fail(`bad option magic 0x${magic.toString(16).padStart(16, '0')}`);
        this.option = h.readUInt32BE(8);
        const len = h.readUInt32BE(12);
        return this.startBody(ST_OPTION_DATA, len, len <= this.maxOption);
      }
      case ST_REQUEST: {
        const magic = h.readUInt32BE(0);
        if (magic !== (this.extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC)) {
          const what = magic === NBD_REQUEST_MAGIC ? 'compact request after extended headers were negotiated' : magic === NBD_EXTENDED_REQUEST_MAGIC ? 'extended request but extended headers were not negotiated' : 'bad request magic';
          return this.fail(`${what} 0x${magic.toString(16).padStart(8, '0')}`);
        }
        const req: ClientRequest = {
          flags: h.readUInt16BE(4),
          type: h.readUInt16BE(6),
          cookie: h.readBigUInt64BE(8),
          offset: readU64(h, 16),
          length: this.extended ? readU64(h, 24) : h.readUInt32BE(24),
        };
        if (req.type !== NBD_CMD_WRITE) {
          this.need = this.requestSize;
          this.handler.onRequest(req);
          return;
        }
        // a payload we would skip must at least end: 64-bit lengths beyond 32 bits are refused
        if (req.length > 0xffffffff) return this.fail(`NBD_CMD_WRITE with a payload of ${h.readBigUInt64BE(24)} bytes`);
        this.req = req;
        return this.startBody(ST_PAYLOAD, req.length, req.length <= this.maxPayload);
      }
    }
  }

  private bodyDone(): void {
    const body = this.body;
    this.body = undefined;
    if (this.state === ST_OPTION_DATA) {
      this.state = ST_WAIT;
      this.handler.onOption(this.option, body, this.bodyLen);
      return;
    }
    const req = this.req!;
    this.req = undefined;
    req.payload = body;
    this.state = ST_REQUEST;
    this.need = this.requestSize;
    this.handler.onRequest(req);
  }
}
