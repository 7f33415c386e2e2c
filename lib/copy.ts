/**
 * copy(src, dst, options): open the endpoints, check the target, compose
 * ExtentSource -> ZeroDetect -> Sink, and resolve with a summary. Endpoints given as specs are
 * opened and closed here; Endpoint objects passed in are left open. With `blkhash` (or `verify`)
 * a BlkhashStream between the source and ZeroDetect hashes the source on the way; `verify`
 * re-reads the target afterwards and checks it against that digest. With `resume`, a state file
 * (lib/resume.ts) records the work ranges written and flushed, and a rerun skips them.
 *
 * Cancellation: when `signal` aborts, no further request is issued, the endpoints copy() opened
 * are closed (after the replies in flight, as NBD wants), and the promise rejects with an
 * NbdStreamError named 'AbortError' (code 'ABORT_ERR', the signal's reason as cause).
 */
import { availableParallelism } from 'node:os';
import { pipelinePromise } from 'streamx';
import { NbdStreamError, abortError, asNbdStreamError, checkOptionNames, throwIfAborted } from './errors.js';
import { isEndpoint, openEndpoint, type EndpointSpec } from './endpoints/open.js';
import { checkNotSource, type Endpoint, type OpenOptions } from './endpoints/endpoint.js';
import { DEFAULT_QUEUE_SIZE, DEFAULT_READ_SIZE, DEFAULT_REQUEST_SIZE, ExtentSource } from './streams/extent-source.js';
import { Sink } from './streams/sink.js';
import { newStats, type CopyStats } from './streams/stats.js';
import { ZeroDetect } from './streams/zero-detect.js';
import { BlkhashStream, BlockHasher, blkhashSpec, hashInto, type BlkhashOptions, type BlkhashResult } from './blkhash.js';
import { ProgressTracker, type CopyProgress } from './progress.js';
import { checkVerifiable, verifyCopy } from './verify.js';
import { ResumeRecorder, ResumeState } from './resume.js';
import { endpointView } from './compare.js';

export interface CopyOptions {
  /**
   * Piece size, a power of two 4 KiB - 32 MiB (default 256 KiB), and the cap on every NBD
   * request on the wire (nbdcopy's --request-size). Consecutive data pieces are read together,
   * up to 4 MiB at a time: such a read goes out as several NBD reads, settled together.
   */
  requestSize?: number;
  /** Requests in flight per connection (default 64). */
  requests?: number;
  /** Bytes in flight (default 16 MiB). */
  queueSize?: number;
  /** NBD connections when multi-conn is allowed (default 4, and never more than `threads`). */
  connections?: number;
  /**
   * nbdcopy's -T: its copying threads, which also cap the connections (default, or 0: the
   * number of processor cores). More connections than cores only make a server's threads
   * contend on a small machine.
   */
  threads?: number;
  /** -S: zero-detection block size (default 4096; 0 = off; off with allocated). */
  sparse?: number;
  /** Fully allocated output: zero with NO_HOLE / ZERO_RANGE, no sparse detection. */
  allocated?: boolean;
  /** The target already reads as zeroes: send no zero requests. */
  destinationIsZero?: boolean;
  /** Ignore extent information: read everything. */
  noExtents?: boolean;
  /** Flush the target at the end. */
  flush?: boolean;
  /** One request at a time, one connection. */
  synchronous?: boolean;
  /** NBD: seconds a request may wait for its reply before its connection is failed (default: none). */
  timeout?: number;
  /** NBD: after a lost connection, reconnect and resend each affected request up to N times. */
  retries?: number;
  /** A pipe target ("-", FIFO): 'raw' bytes (default) or the 'extents' stream (docs/extent-stream.md). */
  pipeFormat?: 'raw' | 'extents';
  /** A pipe source: force 'raw' or 'extents' (default: detected by the stream's header). */
  sourcePipeFormat?: 'raw' | 'extents';
  /**
   * NBD source: copy only the ranges dirty in qemu:dirty-bitmap:NAME (each as data or zero by
   * base:allocation) and leave the rest of the target as it is (files are not truncated).
   */
  dirtyBitmap?: string;
  /**
   * A file source's disk image format (`auto`: detected by its header): read through
   * `qemu-nbd -r -f FORMAT` as the disk it contains (endpoints/image.ts). Without it an image
   * file is copied as raw bytes (the source endpoint's `imageFormat` says which it looks like).
   */
  format?: string;
  /** A file target's image format (e.g. qcow2): created with qemu-img, written through qemu-nbd. */
  targetFormat?: string;
  /**
   * Compute the source's block hash while copying (true: sha256 with 64 KiB blocks; or
   * "ALG[/BLOCKSIZE]", or {algorithm, blockSize}); the summary's `blkhash` holds the digest.
   */
  blkhash?: boolean | string | BlkhashOptions;
  /**
   * After the copy, re-read the target (its data extents) and check its block hash against the
   * source's; a mismatch fails with ERR_VERIFY at the first differing offset.
   */
  verify?: boolean;
  /**
   * A state file (--resume): the work ranges written and flushed to the target are recorded there
   * every few seconds; run again with it after an interruption, the copy skips them (the target
   * is then kept as it is, not truncated) and copies the rest. Refused when the file is for
   * another source or target; removed when the copy succeeds. With blkhash/verify the skipped
   * ranges are hashed by reading the target.
   */
  resume?: string;
  /**
   * Progress: bytes done of total (total undefined for sources of unknown size), and the full
   * report (phase, rates, counters) — called as work completes, ending with phase "done".
   */
  onProgress?: (done: number, total: number | undefined, progress: CopyProgress) => void;
  /** Called once both endpoints are open (e.g. to print -v details), with the sizes in force. */
  onOpen?: (src: Endpoint, dst: Endpoint, sizes: CopySizes) => void;
  /** Cancels the copy: it stops, closes what it opened and rejects with an AbortError. */
  signal?: AbortSignal;
}

/**
 * The sizes a copy runs with, once the endpoints are open. As nbdcopy: the request size is at
 * least either endpoint's preferred block size, and -S (when on) at least the target's, so every
 * request the target gets is aligned to what it advertises.
 */
export interface CopySizes {
  requestSize: number;
  /** -S block size; 0 = off. */
  sparse: number;
  queueSize: number;
}

/** Every CopyOptions name (unknown names are a TypeError). */
export const COPY_OPTIONS: Readonly<Record<keyof CopyOptions, true>> = {
  requestSize: true,
  requests: true,
  queueSize: true,
  connections: true,
  threads: true,
  sparse: true,
  allocated: true,
  destinationIsZero: true,
  noExtents: true,
  flush: true,
  synchronous: true,
  timeout: true,
  retries: true,
  pipeFormat: true,
  sourcePipeFormat: true,
  dirtyBitmap: true,
  format: true,
  targetFormat: true,
  blkhash: true,
  verify: true,
  onProgress: true,
  onOpen: true,
  signal: true,
  resume: true,
};

export interface CopySummary extends CopyStats {
  size: number;
  elapsed: number;
  /** The source's block hash (with the blkhash or verify option). */
  blkhash?: BlkhashResult;
  /** True when verify was asked and the target read back as the source. */
  verified?: boolean;
  /** With resume: bytes of the source an earlier run had copied, skipped by this one. */
  bytesResumed?: number;
}

const MAX_REQUEST_SIZE = 32 * 1024 * 1024;

/** The threads nbdcopy would use: -T, or the processor cores for 0 or none. */
export function copyThreads(threads?: number): number {
  return threads || availableParallelism();
}

export function checkRequestSize(n: number): void {
  if (!Number.isInteger(n) || n < 4096 || n > MAX_REQUEST_SIZE || (n & (n - 1)) !== 0)
    throw new NbdStreamError('ERR_USAGE', `requestSize must be a power of two between 4096 and 33554432, not ${n}`, { option: 'requestSize' });
}

export async function copy(src: EndpointSpec | Endpoint, dst: EndpointSpec | Endpoint, options: CopyOptions = {}): Promise<CopySummary> {
  checkOptionNames('copy()', options, COPY_OPTIONS);
  const signal = options.signal;
  throwIfAborted(signal);
  const started = process.hrtime.bigint();
  let requestSize = options.requestSize ?? DEFAULT_REQUEST_SIZE;
  checkRequestSize(requestSize);
  const sync = options.synchronous ?? false;
  const requests = sync ? 1 : options.requests ?? 64;
  let queueSize = Math.max(options.queueSize ?? DEFAULT_QUEUE_SIZE, requestSize);
  const connections = sync ? 1 : Math.min(options.connections ?? 4, copyThreads(options.threads));
  const allocated = options.allocated ?? false;
  let sparse = allocated ? 0 : options.sparse ?? 4096;
  const openOpts = { connections, requests, queueSize, readRequestSize: requestSize, timeout: options.timeout, retries: options.retries };
  const hashSpec = (options.blkhash !== undefined && options.blkhash !== false) || options.verify ? blkhashSpec(options.blkhash) : undefined;

  const opened: Endpoint[] = [];
  // an endpoint opened after an abort is closed as soon as it is there
  const open = (spec: EndpointSpec, mode: 'source' | 'target', o: OpenOptions) => untilAborted(openEndpoint(spec, mode, o), signal, (late) => void late.close().catch(() => undefined));
  let state: ResumeState | undefined;
  let recorder: ResumeRecorder | undefined;
  try {
    const s = isEndpoint(src)
      ? src
      : await open(src, 'source', { ...openOpts, pipeFormat: options.sourcePipeFormat, dirtyBitmap: options.dirtyBitmap, zeroBlockSize: sparse, format: options.format });
    if (!isEndpoint(src)) opened.push(s);
    // an earlier run's state file is checked against the source before the target is opened
    if (options.resume !== undefined) state = await ResumeState.open(options.resume, s);
    // a partial source (dirty bitmap, incremental extent stream) updates the target in place
    // a target that is the source's file or device is refused as it opens, before it is truncated
    const d = isEndpoint(dst)
      ? dst
      : await open(dst, 'target', { ...openOpts, pipeFormat: options.pipeFormat, sourceSize: s.size, update: s.capabilities.partial || state?.resuming, sourceIdentity: s.identity, format: options.targetFormat });
    if (!isEndpoint(dst)) opened.push(d);
    checkNotSource(d.name, d.identity, s.identity);
    if (d.capabilities.readOnly) throw new NbdStreamError('ERR_UNSUPPORTED', 'target is read-only', { endpoint: d.name });
    if (s.size !== undefined && d.size !== undefined && d.size < s.size)
      throw new NbdStreamError('ERR_TARGET_TOO_SMALL', `target is smaller than the source (${d.size} < ${s.size} bytes)`, { endpoint: d.name });
    if (options.verify) checkVerifiable(s, d);
    await state?.begin(s, d);
    // the endpoints' block sizes (CopySizes)
    requestSize = Math.min(MAX_REQUEST_SIZE, Math.max(requestSize, s.capabilities.preferredBlockSize, d.capabilities.preferredBlockSize));
    queueSize = Math.max(queueSize, requestSize);
    if (sparse) sparse = Math.max(sparse, d.capabilities.preferredBlockSize);
    options.onOpen?.(s, d, { requestSize, sparse, queueSize });
    throwIfAborted(signal);

    const stats = newStats();
    // --queue-size bounds the copy's read buffers from the read until the sink has written
    // them (reads in flight, data on its way, writes in flight): a fast target leaves it all
    // to reads, a slow one holds more in writes
    const resumed = state?.resumedBytes;
    const done = state && new Set(state.done); // the earlier run's ranges
    const source = new ExtentSource(s, { requestSize, readSize: DEFAULT_READ_SIZE, requests, queueSize, extents: !options.noExtents, stats, signal, skip: done && ((ws) => done.has(ws)) });
    const total = s.size;
    const onProgress = options.onProgress;
    const tracker = onProgress ? new ProgressTracker(stats, total, options.verify ?? false, (p) => onProgress(p.bytes_done, p.bytes_total ?? undefined, p)) : undefined;
    tracker?.copied(0);
    // ranges a resumed copy skips are hashed from the target
    const gaps = state && { size: total!, fill: (h: BlockHasher, from: number, to: number) => hashInto(h, endpointView(d, total!), { requestSize, requests, queueSize, skip: (ws) => ws < from || ws >= to }) };
    const hash = hashSpec ? new BlkhashStream(hashSpec, queueSize, gaps) : undefined;
    const sink = new Sink(d, {
      requestSize,
      requests,
      queueSize,
      allocated,
      destinationIsZero: options.destinationIsZero,
      flush: options.flush,
      stats,
      onProgress: tracker ? (done) => tracker.copied(done) : undefined,
      done: resumed,
    });
    if (state) recorder = new ResumeRecorder(state, d, () => sink.written);
    if (hash) await pipelinePromise(source, hash, new ZeroDetect(sparse, queueSize, requestSize), sink);
    else await pipelinePromise(source, new ZeroDetect(sparse, queueSize, requestSize), sink);
    throwIfAborted(signal); // aborted while the target was finishing: not reported as done
    await recorder?.stop(true);
    const size = s.size ?? stats.bytesRead;
    const blkhash = hash ? { ...hash.hasher.spec, digest: hash.hasher.digest() } : undefined;
    let verified: boolean | undefined;
    if (options.verify) {
      tracker?.startVerify(size);
      await verifyCopy(s, d, size, blkhash!, { requestSize: options.requestSize, requests, queueSize, signal, onProgress: tracker ? (n) => tracker.verified(n) : undefined });
      verified = true;
    }
    const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
    // close before reporting success: a failure to close (e.g. lost writes) is a failure
    const toClose = opened.splice(0);
    for (const ep of toClose) await ep.close();
    await state?.remove();
    tracker?.finish(size);
    return { ...stats, size, elapsed, ...(blkhash && { blkhash }), ...(verified !== undefined && { verified }), ...(resumed !== undefined && { bytesResumed: resumed }) };
  } catch (err) {
    // record what was written before the failure (best effort: the target may be gone)
    await recorder?.stop(true).catch(() => undefined);
    // a target that does not verify is copied again in full next time
    if (state && err instanceof NbdStreamError && err.code === 'ERR_VERIFY') await state.remove().catch(() => undefined);
    // after an abort, whatever failed on the way out (a stream torn down, a closed endpoint) is the abort
    if (signal?.aborted) throw abortError(signal);
    if (err instanceof TypeError) throw err; // a caller's mistake (an unknown option ...), as thrown
    throw asNbdStreamError(err, 'ERR_IO');
  } finally {
    await state?.close().catch(() => undefined);
    await Promise.allSettled(opened.map((ep) => ep.close()));
  }
}

/**
 * `p`, or an AbortError as soon as `signal` aborts; a value that arrives after the abort goes to
 * `late` (to be closed).
 */
function untilAborted<T>(p: Promise<T>, signal: AbortSignal | undefined, late: (value: T) => void): Promise<T> {
  if (!signal) return p;
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(abortError(signal));
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        if (signal.aborted) late(v);
        else resolve(v);
      },
      (err: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(err);
      },
    );
  });
}
