/**
 * The extent stream format (docs/extent-stream.md), pure framing with no I/O: a header, then
 * DATA / ZERO records in offset order, then an END record with the image length and the blkhash
 * of the image. ExtentFrameEncoder turns chunks into frames; ExtentFrameDecoder is an
 * incremental parser that turns bytes (split anywhere) back into chunks and checks every
 * integrity rule. Streams live in extent-format.ts.
 *
 * Contracts:
 *  - Encoder: chunks must come in offset order without overlaps. A gap is a ZERO range (or, in an
 *    incremental stream, a range left out). Adjacent zero ranges merge into one ZERO record; data
 *    longer than MAX_DATA_RECORD is cut into several DATA records. Payload buffers are returned
 *    as they are (never copied): the caller decides when the chunk's buffer is free.
 *  - Decoder: push(bytes) returns the chunks completed by those bytes; a DATA payload that lies
 *    within one pushed buffer is returned as a view of it, otherwise it is assembled in a new
 *    buffer. Every violation throws NbdStreamError('ERR_PROTOCOL') naming the image offset and the
 *    stream byte; after one, the decoder stays failed. end() throws unless the END record was
 *    complete and its digest matched, so a truncated stream never reads as a complete one.
 */
import { nodeZlib } from '../builtins.js';
import { NbdStreamError } from '../errors.js';
import type { Chunk } from '../extents.js';
import { BlockHasher, blkhashSpec, type BlkhashAlgorithm, type BlkhashOptions, type BlkhashSpec, MAX_BLKHASH_BLOCK } from '../blkhash.js';

/** "\x89NBDX\r\n\x1a": a high-bit byte, CR LF and ^Z catch 7-bit and newline-translating channels. */
export const MAGIC = Buffer.from([0x89, 0x4e, 0x42, 0x44, 0x58, 0x0d, 0x0a, 0x1a]);
export const VERSION = 1;
/** Version 1 header length; a longer header (later optional fields) is accepted, its tail ignored. */
export const HEADER_SIZE = 36;
export const MAX_HEADER_SIZE = 4096;
export const RECORD_HEADER_SIZE = 24;
/** END trailer without its digest: algorithm (1), reserved (3), block size (4). */
export const END_TRAILER_FIXED = 8;

export const FLAG_SIZE_KNOWN = 1;
/** Records may leave gaps: ranges the receiver leaves as they are (incremental copies). */
export const FLAG_INCREMENTAL = 2;
const KNOWN_FLAGS = FLAG_SIZE_KNOWN | FLAG_INCREMENTAL;

export const TYPE_DATA = 0x44415441; // "DATA"
export const TYPE_ZERO = 0x5a45524f; // "ZERO"
export const TYPE_END = 0x454e4420; // "END "

/** Largest DATA payload (a receiver must hold one whole record). */
export const MAX_DATA_RECORD = 32 * 1024 * 1024;

/** blkhash algorithm ids in the header and END record; 0 = no digest. */
export const HASH_IDS: Record<BlkhashAlgorithm, number> = { md5: 1, sha1: 2, sha256: 3, sha512: 4 };
const HASH_BY_ID: Array<BlkhashAlgorithm | undefined> = [undefined, 'md5', 'sha1', 'sha256', 'sha512'];
const DIGEST_LENGTH: Record<BlkhashAlgorithm, number> = { md5: 16, sha1: 20, sha256: 32, sha512: 64 };

const MAX_SAFE = Number.MAX_SAFE_INTEGER;

// ---------------------------------------------------------------- CRC-32

let crcTable: Uint32Array | undefined;
function crc32js(b: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < b.length; i++) c = crcTable[(c ^ b[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
let crcImpl: ((b: Uint8Array) => number) | undefined;
/** CRC-32 (IEEE 802.3, as zlib and `gzip` compute it): zlib.crc32 where Node has it. */
export function crc32(b: Uint8Array): number {
  if (!crcImpl) {
    const nativeCrc = (nodeZlib() as { crc32?: (b: Uint8Array) => number }).crc32;
    crcImpl = nativeCrc ? (x) => nativeCrc(x) >>> 0 : crc32js;
  }
  return crcImpl(b);
}

// ---------------------------------------------------------------- header

export interface ExtentStreamHeader {
  version: number;
  /** Bytes of the header on the wire (36 for version 1). */
  headerLength: number;
  flags: number;
  /** Image size, when the writer knew it. */
  size: number | undefined;
  /** Records may leave gaps (FLAG_INCREMENTAL). */
  incremental: boolean;
  /** The block hash carried by END, or undefined for none. */
  blkhash: BlkhashSpec | undefined;
}

export interface HeaderOptions {
  size?: number;
  incremental?: boolean;
  /** Block hash for the END record: options or "ALG[/BLOCKSIZE]" (default sha256/64k); false = none. */
  blkhash?: BlkhashOptions | string | boolean;
}

function writeU64(b: Buffer, o: number, n: number): void {
  b.writeUInt32BE(Math.floor(n / 2 ** 32), o);
  b.writeUInt32BE(n >>> 0, o + 4);
}

/** A u64 as a number, or -1 when it does not fit in 2^53 - 1. */
function readU64(b: Buffer, o: number): number {
  const hi = b.readUInt32BE(o);
  if (hi >= 2 ** 21) return -1;
  return hi * 2 ** 32 + b.readUInt32BE(o + 4);
}

function hashSpecOf(o: HeaderOptions['blkhash']): BlkhashSpec | undefined {
  return o === false ? undefined : blkhashSpec(o === true ? undefined : o);
}

/** The 36-byte version 1 header. */
export function encodeHeader(o: HeaderOptions = {}): Buffer {
  const size = o.size;
  if (size !== undefined && (!Number.isSafeInteger(size) || size < 0)) throw new NbdStreamError('ERR_USAGE', `extent stream: bad image size ${size}`);
  if (o.incremental && size === undefined) throw new NbdStreamError('ERR_USAGE', 'extent stream: an incremental stream needs the image size');
  const spec = hashSpecOf(o.blkhash);
  const b = Buffer.alloc(HEADER_SIZE);
  MAGIC.copy(b, 0);
  b.writeUInt16BE(VERSION, 8);
  b.writeUInt16BE(HEADER_SIZE, 10);
  b.writeUInt32BE((size !== undefined ? FLAG_SIZE_KNOWN : 0) | (o.incremental ? FLAG_INCREMENTAL : 0), 12);
  writeU64(b, 16, size ?? 0);
  b[24] = spec ? HASH_IDS[spec.algorithm] : 0;
  b.writeUInt32BE(spec ? spec.blockSize : 0, 28);
  b.writeUInt32BE(crc32(b.subarray(0, HEADER_SIZE - 4)), HEADER_SIZE - 4);
  return b;
}

function protocolError(message: string, streamByte: number, offset?: number): NbdStreamError {
  return new NbdStreamError('ERR_PROTOCOL', `extent stream: ${message} (stream byte ${streamByte})`, { offset });
}

/** True if `b` starts with the magic (or with a prefix of it, when shorter). */
export function looksLikeExtentStream(b: Buffer): boolean {
  const n = Math.min(b.length, MAGIC.length);
  return n > 0 && MAGIC.compare(b, 0, n, 0, n) === 0;
}

/**
 * Check the fixed part of a header (magic, version, header length) from its first 12 bytes and
 * return the header length; throws ERR_PROTOCOL.
 */
export function headerLength(b: Buffer): number {
  if (b.length < 12) throw new RangeError('headerLength needs 12 bytes');
  if (MAGIC.compare(b, 0, 8, 0, 8) !== 0) throw protocolError(`bad magic ${b.subarray(0, 8).toString('hex')} (not an extent stream)`, 0);
  const version = b.readUInt16BE(8);
  if (version !== VERSION) throw protocolError(`unsupported version ${version} (this reader knows version ${VERSION})`, 8);
  const len = b.readUInt16BE(10);
  if (len < HEADER_SIZE || len > MAX_HEADER_SIZE) throw protocolError(`bad header length ${len}`, 10);
  return len;
}

/** Parse and check a whole header (b holds at least headerLength(b) bytes). */
export function decodeHeader(b: Buffer): ExtentStreamHeader {
  const len = headerLength(b);
  if (b.length < len) throw new RangeError(`decodeHeader needs ${len} bytes`);
  const crc = b.readUInt32BE(len - 4);
  const want = crc32(b.subarray(0, len - 4));
  if (crc !== want) throw protocolError(`header checksum mismatch (crc32 ${hex32(crc)}, computed ${hex32(want)})`, len - 4);
  const flags = b.readUInt32BE(12);
  if (flags & ~KNOWN_FLAGS) throw protocolError(`unknown header flags 0x${(flags & ~KNOWN_FLAGS).toString(16)}`, 12);
  const sizeKnown = (flags & FLAG_SIZE_KNOWN) !== 0;
  const incremental = (flags & FLAG_INCREMENTAL) !== 0;
  const rawSize = readU64(b, 16);
  if (rawSize < 0) throw protocolError('image size exceeds 2^53 - 1', 16);
  if (!sizeKnown && rawSize !== 0) throw protocolError('image size set without the SIZE_KNOWN flag', 16);
  if (incremental && !sizeKnown) throw protocolError('INCREMENTAL stream without an image size', 12);
  if (b[25] !== 0 || b[26] !== 0 || b[27] !== 0) throw protocolError('reserved header bytes are not zero', 25);
  const id = b[24];
  const blockSize = b.readUInt32BE(28);
  let blkhash: BlkhashSpec | undefined;
  if (id === 0) {
    if (blockSize !== 0) throw protocolError('block size set without a hash algorithm', 28);
  } else {
    const algorithm = HASH_BY_ID[id];
    if (!algorithm) throw protocolError(`unknown hash algorithm ${id}`, 24);
    if (blockSize < 1 || blockSize > MAX_BLKHASH_BLOCK) throw protocolError(`bad hash block size ${blockSize}`, 28);
    blkhash = { algorithm, blockSize };
  }
  return { version: VERSION, headerLength: len, flags, size: sizeKnown ? rawSize : undefined, incremental, blkhash };
}

function hex32(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}

export function typeName(type: number): string {
  const s = Buffer.alloc(4);
  s.writeUInt32BE(type >>> 0);
  return /^[\x20-\x7e]{4}$/.test(s.toString('latin1')) ? JSON.stringify(s.toString('latin1')) : hex32(type);
}

// ---------------------------------------------------------------- records

/** A 24-byte record header: type, offset, length, CRC-32 of the first 20 bytes. */
export function encodeRecordHeader(type: number, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(RECORD_HEADER_SIZE);
  b.writeUInt32BE(type >>> 0, 0);
  writeU64(b, 4, offset);
  writeU64(b, 12, length);
  b.writeUInt32BE(crc32(b.subarray(0, 20)), 20);
  return b;
}

/** The END record: header (offset = image length, length = trailer length) and trailer. */
export function encodeEnd(total: number, spec: BlkhashSpec | undefined, digest: Buffer | undefined): Buffer {
  const dlen = digest?.length ?? 0;
  const trailer = Buffer.alloc(END_TRAILER_FIXED + dlen);
  if (spec && digest) {
    trailer[0] = HASH_IDS[spec.algorithm];
    trailer.writeUInt32BE(spec.blockSize, 4);
    digest.copy(trailer, END_TRAILER_FIXED);
  }
  return Buffer.concat([encodeRecordHeader(TYPE_END, total, trailer.length), trailer]);
}

// ---------------------------------------------------------------- encoder

export interface EncoderOptions extends HeaderOptions {}

/**
 * Chunks in, frames out. Each call returns the buffers to write next, in order (possibly none:
 * zero ranges are held back so that adjacent ones merge).
 */
export class ExtentFrameEncoder {
  readonly header: ExtentStreamHeader;
  /** Image offset covered so far. */
  position = 0;
  /** Stream bytes produced so far (header included once header() was taken). */
  bytes = 0;
  /** DATA payload bytes produced. */
  dataBytes = 0;
  records = { data: 0, zero: 0 };
  private readonly hasher: BlockHasher | undefined;
  private zeroStart = -1;
  private zeroEnd = -1;
  private ended = false;
  private headerTaken = false;
  private readonly headerBytes: Buffer;

  constructor(o: EncoderOptions = {}) {
    this.headerBytes = encodeHeader(o);
    this.header = decodeHeader(this.headerBytes);
    this.hasher = this.header.blkhash ? new BlockHasher(this.header.blkhash) : undefined;
  }

  /** The stream header (once: later calls return an empty list). */
  start(): Buffer[] {
    return this.out(this.takeHeader());
  }

  private takeHeader(): Buffer[] {
    if (this.headerTaken) return [];
    this.headerTaken = true;
    return [this.headerBytes];
  }

  /** Frames for one chunk. */
  chunk(c: Chunk): Buffer[] {
    return c.kind === 'data' ? this.data(c.offset, c.data!.length === c.length ? c.data! : c.data!.subarray(0, c.length)) : this.zero(c.offset, c.length);
  }

  data(offset: number, data: Buffer): Buffer[] {
    const frames = this.advance(offset, data.length);
    if (data.length === 0) return this.out(frames);
    frames.push(...this.flushZero());
    for (let o = 0; o < data.length; o += MAX_DATA_RECORD) {
      const piece = data.length <= MAX_DATA_RECORD ? data : data.subarray(o, Math.min(data.length, o + MAX_DATA_RECORD));
      frames.push(encodeRecordHeader(TYPE_DATA, offset + o, piece.length), piece);
      this.records.data++;
      this.dataBytes += piece.length;
    }
    this.hasher?.update(data);
    this.position = offset + data.length;
    return this.out(frames);
  }

  zero(offset: number, length: number): Buffer[] {
    const frames = this.advance(offset, length);
    if (length > 0) {
      this.addZero(offset, length);
      this.position = offset + length;
    }
    return this.out(frames);
  }

  /** Pending zeroes, the rest of the image as zero (non-incremental, size known), and END. */
  end(): Buffer[] {
    if (this.ended) throw new NbdStreamError('ERR_USAGE', 'extent stream: end() was already called');
    const frames = this.takeHeader();
    const size = this.header.size;
    if (size !== undefined && this.position < size) {
      if (this.header.incremental) frames.push(...this.skipTo(size));
      else this.addZero(this.position, size - this.position);
      this.position = size;
    }
    frames.push(...this.flushZero());
    this.ended = true;
    const spec = this.header.blkhash;
    const digest = this.hasher ? Buffer.from(this.hasher.digest(), 'hex') : undefined;
    frames.push(encodeEnd(this.position, spec, digest));
    return this.out(frames);
  }

  /** The digest carried by END (after end()). */
  get digest(): string | undefined {
    return this.ended ? this.hasher?.digest() : undefined;
  }

  /** Check order and bounds; fill a gap (zero, or skipped in an incremental stream). */
  private advance(offset: number, length: number): Buffer[] {
    if (this.ended) throw new NbdStreamError('ERR_USAGE', 'extent stream: write after end()', { offset });
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > MAX_SAFE)
      throw new NbdStreamError('ERR_USAGE', `extent stream: bad range ${offset}+${length}`, { offset });
    if (offset < this.position) throw new NbdStreamError('ERR_USAGE', `extent stream: chunk at ${offset} overlaps what was written up to ${this.position}`, { offset });
    const size = this.header.size;
    if (size !== undefined && offset + length > size) throw new NbdStreamError('ERR_USAGE', `extent stream: chunk ${offset}+${length} ends past the image size ${size}`, { offset });
    const frames = this.takeHeader();
    if (offset > this.position) {
      if (this.header.incremental) frames.push(...this.skipTo(offset));
      else this.addZero(this.position, offset - this.position);
      this.position = offset;
    }
    return frames;
  }

  /** Incremental gap: hashed as zeroes, not sent. */
  private skipTo(offset: number): Buffer[] {
    const frames = this.flushZero();
    this.hasher?.zeroes(offset - this.position);
    return frames;
  }

  private addZero(offset: number, length: number): void {
    if (this.zeroStart >= 0 && this.zeroEnd === offset) this.zeroEnd += length;
    else {
      this.zeroStart = offset;
      this.zeroEnd = offset + length;
    }
    this.hasher?.zeroes(length);
  }

  private flushZero(): Buffer[] {
    if (this.zeroStart < 0) return [];
    const frame = encodeRecordHeader(TYPE_ZERO, this.zeroStart, this.zeroEnd - this.zeroStart);
    this.records.zero++;
    this.zeroStart = this.zeroEnd = -1;
    return [frame];
  }

  private out(frames: Buffer[]): Buffer[] {
    for (const f of frames) this.bytes += f.length;
    return frames;
  }
}

/** A whole stream for a list of chunks (tests, small images). */
export function encodeExtentStream(chunks: Iterable<Chunk>, o: EncoderOptions = {}): Buffer {
  const enc = new ExtentFrameEncoder(o);
  const out = enc.start();
  for (const c of chunks) out.push(...enc.chunk(c));
  out.push(...enc.end());
  return Buffer.concat(out);
}

// ---------------------------------------------------------------- decoder

type State = 'header' | 'record' | 'payload' | 'trailer' | 'done' | 'failed';

export interface DecoderOptions {
  /** Called once the header has been read and checked. */
  onHeader?: (h: ExtentStreamHeader) => void;
  /** Check the END digest (default true; false still checks everything else). */
  verify?: boolean;
}

export interface DecodeResult {
  /** Image length from END. */
  size: number;
  blkhash: (BlkhashSpec & { digest: string }) | undefined;
}

/**
 * Bytes in, chunks out. Zero records become zero chunks; gaps of an incremental stream produce
 * nothing (the receiver leaves those ranges alone).
 */
export class ExtentFrameDecoder {
  header: ExtentStreamHeader | undefined;
  /** Stream bytes consumed. */
  streamOffset = 0;
  /** Image offset covered by the records so far. */
  position = 0;
  /** Set once END was read and checked. */
  result: DecodeResult | undefined;
  records = { data: 0, zero: 0 };
  dataBytes = 0;
  private state: State = 'header';
  private failure: NbdStreamError | undefined;
  /** Bytes of a header, record header or trailer being collected. */
  private acc: Buffer = Buffer.alloc(MAX_HEADER_SIZE);
  private accLen = 0;
  private need = 12;
  private hasher: BlockHasher | undefined;
  /** The DATA record being received. */
  private recOffset = 0;
  private recLength = 0;
  private payload: Buffer | undefined;
  private payloadLen = 0;
  /** END record fields. */
  private endTotal = 0;
  private readonly onHeader?: (h: ExtentStreamHeader) => void;
  private readonly verify: boolean;

  constructor(o: DecoderOptions = {}) {
    this.onHeader = o.onHeader;
    this.verify = o.verify ?? true;
  }

  get done(): boolean {
    return this.state === 'done';
  }

  /** Feed bytes; returns the chunks they complete. Throws ERR_PROTOCOL. */
  push(buf: Buffer): Chunk[] {
    if (this.failure) throw this.failure;
    const out: Chunk[] = [];
    try {
      this.consume(buf, out);
    } catch (err) {
      this.state = 'failed';
      this.failure = err instanceof NbdStreamError ? err : protocolError(String((err as Error)?.message ?? err), this.streamOffset);
      throw this.failure;
    }
    return out;
  }

  /** The input has ended: throws unless the stream was complete. */
  end(): DecodeResult {
    if (this.failure) throw this.failure;
    if (this.state === 'done') return this.result!;
    const where =
      this.state === 'header'
        ? this.streamOffset === 0
          ? 'the stream is empty'
          : `the stream ends inside the header after ${this.streamOffset} bytes`
        : this.state === 'payload'
          ? `the stream ends inside the DATA record at offset ${this.recOffset} (${this.payloadLen} of ${this.recLength} payload bytes)`
          : this.state === 'trailer'
            ? 'the stream ends inside the END record'
            : this.accLen > 0
              ? `the stream ends inside a record header after image offset ${this.position}`
              : `the stream ends after image offset ${this.position}`;
    const offset = this.state === 'header' ? undefined : this.state === 'payload' ? this.recOffset : this.position;
    this.state = 'failed';
    this.failure = protocolError(`truncated: ${where} without an END record`, this.streamOffset, offset);
    throw this.failure;
  }

  private consume(buf: Buffer, out: Chunk[]): void {
    let pos = 0;
    const n = buf.length;
    while (pos < n) {
      switch (this.state) {
        case 'payload': {
          const want = this.recLength - this.payloadLen;
          const take = Math.min(want, n - pos);
          if (!this.payload && take === this.recLength) {
            // the whole payload is in this buffer: hand out a view
            const data = buf.subarray(pos, pos + take);
            pos += take;
            this.streamOffset += take;
            this.payloadLen = take;
            this.finishData(data, out);
            break;
          }
          this.payload ??= Buffer.allocUnsafe(this.recLength);
          buf.copy(this.payload, this.payloadLen, pos, pos + take);
          this.payloadLen += take;
          pos += take;
          this.streamOffset += take;
          if (this.payloadLen === this.recLength) {
            const data = this.payload;
            this.payload = undefined;
            this.finishData(data, out);
          }
          break;
        }
        case 'done':
          throw protocolError(`${n - pos} bytes after the END record`, this.streamOffset, this.position);
        case 'failed':
          throw this.failure!;
        default: {
          const take = Math.min(this.need - this.accLen, n - pos);
          if (this.state === 'header' && this.accLen < MAGIC.length) {
            // reject a wrong first byte at once (a raw image fed to the decoder)
            const m = Math.min(take, MAGIC.length - this.accLen);
            if (MAGIC.compare(buf, pos, pos + m, this.accLen, this.accLen + m) !== 0) {
              buf.copy(this.acc, this.accLen, pos, pos + m);
              throw protocolError(`bad magic ${this.acc.subarray(0, this.accLen + m).toString('hex')} (not an extent stream)`, 0);
            }
          }
          buf.copy(this.acc, this.accLen, pos, pos + take);
          this.accLen += take;
          pos += take;
          if (this.accLen < this.need) {
            this.streamOffset += take;
            break;
          }
          const start = this.streamOffset + take - this.accLen; // stream byte where acc begins
          this.streamOffset += take;
          this.completed(start, out);
        }
      }
    }
  }

  /** `acc` holds `need` bytes of the current structure, which began at stream byte `start`. */
  private completed(start: number, out: Chunk[]): void {
    const b = this.acc.subarray(0, this.accLen);
    if (this.state === 'header') {
      if (this.need === 12) {
        this.need = headerLength(b);
        if (this.need > 12) return;
      }
      const h = decodeHeader(b);
      this.header = h;
      this.hasher = h.blkhash && this.verify ? new BlockHasher(h.blkhash) : undefined;
      this.reset('record', RECORD_HEADER_SIZE);
      this.onHeader?.(h);
      return;
    }
    if (this.state === 'record') return this.record(b, start, out);
    if (this.state === 'trailer') return this.trailer(b, start);
  }

  private reset(state: State, need: number): void {
    this.state = state;
    this.need = need;
    this.accLen = 0;
  }

  private record(b: Buffer, start: number, out: Chunk[]): void {
    const h = this.header!;
    const crc = b.readUInt32BE(20);
    const want = crc32(b.subarray(0, 20));
    if (crc !== want) throw protocolError(`record header checksum mismatch after image offset ${this.position} (crc32 ${hex32(crc)}, computed ${hex32(want)})`, start, this.position);
    const type = b.readUInt32BE(0);
    const offset = readU64(b, 4);
    const length = readU64(b, 12);
    if (type !== TYPE_DATA && type !== TYPE_ZERO && type !== TYPE_END)
      throw protocolError(`unknown record type ${typeName(type)} after image offset ${this.position}`, start, this.position);
    const name = type === TYPE_DATA ? 'DATA' : type === TYPE_ZERO ? 'ZERO' : 'END';
    if (offset < 0 || length < 0 || offset + length > MAX_SAFE)
      throw protocolError(`${name} record with offset or length beyond 2^53 - 1 after image offset ${this.position}`, start, this.position);
    if (type === TYPE_END) return this.endRecord(offset, length, start);
    if (length === 0) throw protocolError(`${name} record at offset ${offset} has length 0`, start, offset);
    if (type === TYPE_DATA && length > MAX_DATA_RECORD)
      throw protocolError(`DATA record at offset ${offset} has length ${length}, more than the ${MAX_DATA_RECORD}-byte limit`, start, offset);
    if (h.size !== undefined && offset + length > h.size)
      throw protocolError(`${name} record ${offset}+${length} ends past the image size ${h.size}`, start, offset);
    if (offset < this.position) throw protocolError(`${name} record at offset ${offset} overlaps the previous record, which ends at ${this.position}`, start, offset);
    if (offset > this.position) {
      if (!h.incremental) throw protocolError(`gap: ${name} record at offset ${offset}, but the previous record ends at ${this.position}`, start, offset);
      this.hasher?.zeroes(offset - this.position);
    }
    if (type === TYPE_ZERO) {
      this.hasher?.zeroes(length);
      this.position = offset + length;
      this.records.zero++;
      out.push({ offset, length, kind: 'zero' });
      this.reset('record', RECORD_HEADER_SIZE);
      return;
    }
    this.recOffset = offset;
    this.recLength = length;
    this.payloadLen = 0;
    this.payload = undefined;
    this.state = 'payload';
    this.accLen = 0;
  }

  private finishData(data: Buffer, out: Chunk[]): void {
    this.hasher?.update(data);
    this.position = this.recOffset + this.recLength;
    this.records.data++;
    this.dataBytes += data.length;
    out.push({ offset: this.recOffset, length: this.recLength, kind: 'data', data });
    this.reset('record', RECORD_HEADER_SIZE);
  }

  private endRecord(total: number, length: number, start: number): void {
    const h = this.header!;
    const dlen = h.blkhash ? DIGEST_LENGTH[h.blkhash.algorithm] : 0;
    if (length !== END_TRAILER_FIXED + dlen)
      throw protocolError(`END record has a trailer of ${length} bytes, expected ${END_TRAILER_FIXED + dlen}`, start, total);
    if (h.incremental) {
      if (total !== h.size) throw protocolError(`END says the image is ${total} bytes, the header says ${h.size}`, start, total);
      if (total > this.position) this.hasher?.zeroes(total - this.position);
    } else {
      if (total !== this.position)
        throw protocolError(`END says the image is ${total} bytes, but the records end at ${this.position}${total > this.position ? ' (records missing)' : ''}`, start, total);
      if (h.size !== undefined && total !== h.size) throw protocolError(`END says the image is ${total} bytes, the header says ${h.size}`, start, total);
    }
    this.endTotal = total;
    this.reset('trailer', length);
  }

  private trailer(b: Buffer, start: number): void {
    const h = this.header!;
    const total = this.endTotal;
    const id = b[0];
    const wantId = h.blkhash ? HASH_IDS[h.blkhash.algorithm] : 0;
    if (id !== wantId) throw protocolError(`END names hash algorithm ${id}, the header ${wantId}`, start, total);
    if (b[1] !== 0 || b[2] !== 0 || b[3] !== 0) throw protocolError('reserved END bytes are not zero', start + 1, total);
    const bs = b.readUInt32BE(4);
    if (bs !== (h.blkhash?.blockSize ?? 0)) throw protocolError(`END names hash block size ${bs}, the header ${h.blkhash?.blockSize ?? 0}`, start + 4, total);
    let blkhash: DecodeResult['blkhash'];
    if (h.blkhash) {
      const got = b.subarray(END_TRAILER_FIXED).toString('hex');
      if (this.hasher) {
        const want = this.hasher.digest();
        if (got !== want) throw protocolError(`blkhash mismatch: END says ${h.blkhash.algorithm} ${got}, the records hash to ${want}`, start + END_TRAILER_FIXED, total);
      }
      blkhash = { ...h.blkhash, digest: got };
    }
    this.position = total;
    this.result = { size: total, blkhash };
    this.reset('done', 0);
  }
}

/** Decode a whole stream (tests, small images): chunks with copied data, and the END result. */
export function decodeExtentStream(b: Buffer, o: DecoderOptions = {}): { header: ExtentStreamHeader; chunks: Chunk[]; result: DecodeResult } {
  const d = new ExtentFrameDecoder(o);
  const chunks = d.push(b);
  const result = d.end();
  return { header: d.header!, chunks, result };
}
