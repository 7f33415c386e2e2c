/**
 * Block hash ("blkhash"), as newer nbdcopy prints it: the image is cut into blocks of
 * `blockSize` bytes (the last one may be shorter), each block is hashed on its own, and the
 * digest is the hash of the concatenated block digests followed by the image length as a
 * 64-bit little-endian integer:
 *
 *   D = H( H(b0) ‖ H(b1) ‖ … ‖ H(bN−1) ‖ le64(length) )
 *
 * The last block is hashed at its real length; an empty image gives H(le64(0)).
 *
 * Zeroes cost no reads and no hashing of zero bytes: a whole block of zeroes has the digest
 * H(zero block), computed once per algorithm and block size, and a run of N such blocks feeds N
 * copies of that digest to the outer hash. Chunks need not be aligned to blocks: the partial
 * head and tail bytes of a chunk are buffered (copied) until the block is complete; whole blocks
 * are hashed straight from the chunk's buffer. A block only partly covered by zero ranges is
 * hashed with real zero bytes.
 */
import { nodeCrypto } from './builtins.js';
import { Transform, Writable, pipelinePromise } from 'streamx';
import { NbdStreamError } from './errors.js';
import type { Chunk } from './extents.js';
import type { Endpoint } from './endpoints/endpoint.js';
import { ExtentSource, STAGE_BUFFER, chunkBytes } from './streams/extent-source.js';

export const BLKHASH_ALGORITHMS = ['md5', 'sha1', 'sha256', 'sha512'] as const;
export type BlkhashAlgorithm = (typeof BLKHASH_ALGORITHMS)[number];

export interface BlkhashOptions {
  /** md5, sha1, sha256 (default) or sha512. */
  algorithm?: BlkhashAlgorithm;
  /** Block size in bytes (default 64 KiB), 1 B – 64 MiB. */
  blockSize?: number;
}

export interface BlkhashSpec {
  algorithm: BlkhashAlgorithm;
  blockSize: number;
}

export interface BlkhashResult extends BlkhashSpec {
  /** Lowercase hex. */
  digest: string;
}

export const DEFAULT_BLKHASH: Readonly<BlkhashSpec> = Object.freeze({ algorithm: 'sha256', blockSize: 64 * 1024 });
export const MAX_BLKHASH_BLOCK = 64 * 1024 * 1024;

/** "sha256/64k" style name of a spec. */
export function formatBlkhash(spec: BlkhashSpec): string {
  return `${spec.algorithm}/${spec.blockSize}`;
}

/**
 * Parse "ALG[/BLOCKSIZE]" ("", "sha1", "md5/4k", "sha512/1M", "/4096"): missing parts take the
 * defaults (sha256, 64 KiB). Throws ERR_USAGE.
 */
export function parseBlkhash(text: string): BlkhashSpec {
  const m = /^([a-z0-9]*)(?:\/(\d+)([kKmM]?))?$/i.exec(text.trim());
  const bad = () =>
    new NbdStreamError('ERR_USAGE', `blkhash: expected ALG[/BLOCKSIZE] with ALG one of ${BLKHASH_ALGORITHMS.join(', ')} and BLOCKSIZE like 4k or 65536, not "${text}"`, { option: 'blkhash' });
  if (!m) throw bad();
  const alg = (m[1] || DEFAULT_BLKHASH.algorithm).toLowerCase();
  if (!(BLKHASH_ALGORITHMS as readonly string[]).includes(alg)) throw bad();
  let blockSize = DEFAULT_BLKHASH.blockSize;
  if (m[2] !== undefined) blockSize = Number(m[2]) * ({ '': 1, k: 1024, m: 1024 * 1024 }[m[3].toLowerCase() as '' | 'k' | 'm']);
  return checkSpec({ algorithm: alg as BlkhashAlgorithm, blockSize });
}

/** Fill in defaults and validate (ERR_USAGE). */
export function blkhashSpec(o: BlkhashOptions | string | boolean | undefined): BlkhashSpec {
  if (typeof o === 'string') return parseBlkhash(o);
  if (o === undefined || typeof o === 'boolean') return { ...DEFAULT_BLKHASH };
  return checkSpec({ algorithm: o.algorithm ?? DEFAULT_BLKHASH.algorithm, blockSize: o.blockSize ?? DEFAULT_BLKHASH.blockSize });
}

function checkSpec(s: BlkhashSpec): BlkhashSpec {
  if (!(BLKHASH_ALGORITHMS as readonly string[]).includes(s.algorithm))
    throw new NbdStreamError('ERR_USAGE', `blkhash: unknown algorithm "${s.algorithm}" (expected one of ${BLKHASH_ALGORITHMS.join(', ')})`, { option: 'blkhash' });
  if (!Number.isSafeInteger(s.blockSize) || s.blockSize < 1 || s.blockSize > MAX_BLKHASH_BLOCK)
    throw new NbdStreamError('ERR_USAGE', `blkhash: block size must be between 1 and ${MAX_BLKHASH_BLOCK} bytes, not ${s.blockSize}`, { option: 'blkhash' });
  return s;
}

// ---------------------------------------------------------------- shared zero material

const ZERO_SLICE = 1024 * 1024;
/** Shared zero bytes, never written to (at most 1 MiB; longer ranges are walked in slices). */
let zeroBuf = Buffer.alloc(0);
function zeroBytes(n: number): Buffer {
  if (zeroBuf.length < n) zeroBuf = Buffer.alloc(Math.min(Math.max(n, 64 * 1024), ZERO_SLICE));
  return zeroBuf;
}

/** True if b is all zero bytes. */
function allZero(b: Buffer): boolean {
  const n = b.length;
  if (n === 0) return true;
  if (b[0] !== 0 || b[n - 1] !== 0) return false;
  const z = zeroBytes(Math.min(n, ZERO_SLICE));
  for (let o = 0; o < n; o += ZERO_SLICE) {
    const e = Math.min(n, o + ZERO_SLICE);
    if (z.compare(b, o, e, 0, e - o) !== 0) return false;
  }
  return true;
}

interface ZeroInfo {
  /** H(zero block of blockSize bytes). */
  digest: Buffer;
  /** The digest repeated, to feed runs of zero blocks to the outer hash in few calls. */
  repeated: Buffer;
}

const zeroInfo = new Map<string, ZeroInfo>();

/** H(blockSize zero bytes), computed once per algorithm and block size. */
export function zeroBlockDigest(algorithm: BlkhashAlgorithm, blockSize: number): Buffer {
  return zeroInfoFor(algorithm, blockSize).digest;
}

function zeroInfoFor(algorithm: BlkhashAlgorithm, blockSize: number): ZeroInfo {
  const key = `${algorithm}/${blockSize}`;
  let info = zeroInfo.get(key);
  if (!info) {
    const h = nodeCrypto().createHash(algorithm);
    const z = zeroBytes(Math.min(blockSize, ZERO_SLICE));
    for (let left = blockSize; left > 0; left -= ZERO_SLICE) h.update(z.subarray(0, Math.min(left, ZERO_SLICE)));
    const digest = h.digest();
    const copies = Math.max(1, Math.floor((64 * 1024) / digest.length));
    const repeated = Buffer.allocUnsafe(copies * digest.length);
    for (let i = 0; i < copies; i++) digest.copy(repeated, i * digest.length);
    info = { digest, repeated };
    zeroInfo.set(key, info);
  }
  return info;
}

/** H(data) in one call (crypto.hash where Node has it). */
function oneShot(alg: string, data: Buffer): Buffer {
  const { hash, createHash } = nodeCrypto();
  return typeof hash === 'function' ? hash(alg, data, 'buffer') : createHash(alg).update(data).digest();
}

// ---------------------------------------------------------------- the hasher

/**
 * Incremental blkhash over an image fed in order: update(data) for bytes, zero(n) for zero
 * ranges, digest() at the end. Keeps no reference to the buffers it is given.
 */
export class BlockHasher implements BlkhashSpec {
  readonly algorithm: BlkhashAlgorithm;
  readonly blockSize: number;
  /** Bytes fed so far (the image length once finished). */
  length = 0;
  /** Whole blocks hashed from data (not counting zero blocks recognised without hashing). */
  blocksHashed = 0;
  private readonly outer;
  private readonly zero: ZeroInfo;
  private readonly pending: Buffer;
  private pendingLen = 0;
  private result: string | undefined;

  constructor(options: BlkhashOptions | string = {}) {
    const spec = blkhashSpec(options);
    this.algorithm = spec.algorithm;
    this.blockSize = spec.blockSize;
    this.outer = nodeCrypto().createHash(spec.algorithm);
    this.zero = zeroInfoFor(spec.algorithm, spec.blockSize);
    this.pending = Buffer.alloc(spec.blockSize);
  }

  /** Feed image bytes. */
  update(data: Buffer): this {
    this.checkOpen();
    const bs = this.blockSize;
    const n = data.length;
    let pos = 0;
    if (this.pendingLen > 0) {
      const k = Math.min(bs - this.pendingLen, n);
      data.copy(this.pending, this.pendingLen, 0, k);
      this.pendingLen += k;
      pos = k;
      if (this.pendingLen === bs) this.flushPending();
    }
    for (; n - pos >= bs; pos += bs) this.block(data.subarray(pos, pos + bs));
    if (pos < n) {
      data.copy(this.pending, 0, pos, n);
      this.pendingLen = n - pos;
    }
    this.length += n;
    return this;
  }

  /** Feed `length` zero bytes without materialising them. */
  zeroes(length: number): this {
    this.checkOpen();
    if (!Number.isSafeInteger(length) || length < 0) throw new RangeError(`bad zero length ${length}`);
    const bs = this.blockSize;
    let left = length;
    if (this.pendingLen > 0) {
      const k = Math.min(bs - this.pendingLen, left);
      this.pending.fill(0, this.pendingLen, this.pendingLen + k);
      this.pendingLen += k;
      left -= k;
      if (this.pendingLen === bs) this.flushPending();
    }
    let blocks = Math.floor(left / bs);
    const rep = this.zero.repeated;
    const dlen = this.zero.digest.length;
    const per = rep.length / dlen;
    while (blocks > 0) {
      const k = Math.min(blocks, per);
      this.outer.update(k === per ? rep : rep.subarray(0, k * dlen));
      blocks -= k;
    }
    const rest = left % bs;
    if (rest > 0) {
      this.pending.fill(0, 0, rest);
      this.pendingLen = rest;
    }
    this.length += length;
    return this;
  }

  /** Feed a chunk of the copy pipeline (in offset order). */
  chunk(c: Chunk): this {
    if (c.offset !== this.length) throw new NbdStreamError('ERR_USAGE', `blkhash: chunk at offset ${c.offset}, expected ${this.length}`, { offset: c.offset });
    return c.kind === 'data' ? this.update(c.data!.length === c.length ? c.data! : c.data!.subarray(0, c.length)) : this.zeroes(c.length);
  }

  /** Finish: the lowercase hex digest (the hasher can take no more input; later calls return the same). */
  digest(): string {
    if (this.result !== undefined) return this.result;
    if (this.pendingLen > 0) {
      // the last block, at its real length
      this.outer.update(oneShot(this.algorithm, this.pending.subarray(0, this.pendingLen)));
      this.blocksHashed++;
      this.pendingLen = 0;
    }
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(this.length));
    this.outer.update(len);
    this.result = this.outer.digest('hex');
    return this.result;
  }

  get spec(): BlkhashSpec {
    return { algorithm: this.algorithm, blockSize: this.blockSize };
  }

  private flushPending(): void {
    this.block(this.pending);
    this.pendingLen = 0;
  }

  /** One whole block: the precomputed digest if it is all zeroes, else its hash. */
  private block(b: Buffer): void {
    if (allZero(b)) this.outer.update(this.zero.digest);
    else {
      this.outer.update(oneShot(this.algorithm, b));
      this.blocksHashed++;
    }
  }

  private checkOpen(): void {
    if (this.result !== undefined) throw new NbdStreamError('ERR_USAGE', 'blkhash: digest() was already called');
  }
}

/** blkhash of a whole Buffer (for tests and small images). */
export function blkhashBuffer(data: Buffer, options: BlkhashOptions | string = {}): string {
  return new BlockHasher(options).update(data).digest();
}

// ---------------------------------------------------------------- streams

/**
 * Hashes a range the copy pipeline leaves out (--resume: work ranges an earlier run copied):
 * feeds [from, to) to the hasher, e.g. by reading the target there (hashInto with `skip`).
 */
export type HashGapFill = (hasher: BlockHasher, from: number, to: number) => Promise<void>;

/**
 * A pass-through Transform for the copy pipeline: hashes every chunk (in offset order) and
 * passes it on unchanged. It neither keeps nor releases chunk buffers. With `gaps`, ranges
 * without chunks (before a chunk, and up to `gaps.size` at the end) are hashed by `gaps.fill`.
 */
export class BlkhashStream extends Transform {
  readonly hasher: BlockHasher;
  private readonly gaps: { size: number; fill: HashGapFill } | undefined;

  constructor(options: BlkhashOptions | string = {}, queueSize = 16 * 1024 * 1024, gaps?: { size: number; fill: HashGapFill }) {
    // a small buffer between stages, as ZeroDetect: the source's in-flight limits bound memory
    super({ highWaterMark: Math.min(queueSize, STAGE_BUFFER), byteLength: (c) => chunkBytes(c as Chunk) });
    this.hasher = new BlockHasher(options);
    this.gaps = gaps;
  }

  override _transform(data: unknown, cb: (err: Error | null, out?: unknown) => void): void {
    const c = data as Chunk;
    const hash = () => {
      try {
        this.hasher.chunk(c);
      } catch (err) {
        return cb(err as Error);
      }
      cb(null, c);
    };
    if (this.gaps && c.offset > this.hasher.length) this.gaps.fill(this.hasher, this.hasher.length, c.offset).then(hash, cb);
    else hash();
  }

  override _flush(cb: (err: Error | null) => void): void {
    if (!this.gaps || this.hasher.length >= this.gaps.size) return cb(null);
    this.gaps.fill(this.hasher, this.hasher.length, this.gaps.size).then(() => cb(null), cb);
  }
}

export interface HashEndpointOptions extends BlkhashOptions {
  requestSize?: number;
  requests?: number;
  queueSize?: number;
  /** Use extent information (default true): zero extents are not read. */
  extents?: boolean;
  /** Called with the bytes hashed so far. */
  onProgress?: (bytesDone: number) => void;
  /** Stops the reads: rejects with an AbortError. */
  signal?: AbortSignal;
}

/** blkhash of an open endpoint, reading only what its extents say is data. */
export async function hashEndpoint(ep: Endpoint, options: HashEndpointOptions = {}): Promise<BlkhashResult> {
  const hasher = new BlockHasher(options);
  await hashInto(hasher, ep, options);
  return { ...hasher.spec, digest: hasher.digest() };
}

/**
 * Feed an endpoint to `hasher` (which must have had everything before the first range read),
 * reading only what its extents say is data; `skip` leaves work ranges out (ExtentSource).
 */
export async function hashInto(hasher: BlockHasher, ep: Endpoint, options: Omit<HashEndpointOptions, keyof BlkhashOptions> & { skip?: (workRangeStart: number) => boolean } = {}): Promise<void> {
  const source = new ExtentSource(ep, { requestSize: options.requestSize, requests: options.requests, queueSize: options.queueSize, extents: options.extents, skip: options.skip, signal: options.signal });
  const onProgress = options.onProgress;
  const sink = new Writable({
    highWaterMark: Math.min(options.queueSize ?? STAGE_BUFFER, STAGE_BUFFER),
    byteLength: (c) => chunkBytes(c as Chunk),
    write(data: unknown, cb: (err: Error | null) => void) {
      const c = data as Chunk;
      try {
        hasher.chunk(c);
      } catch (err) {
        return cb(err as Error);
      } finally {
        c.release?.();
      }
      onProgress?.(hasher.length);
      cb(null);
    },
  });
  await pipelinePromise(source, sink);
}
