/**
 * --verify: after a copy, re-read the target (only what its extents call data) and check its
 * blkhash against the source's, computed during the copy. On a mismatch, find the first bad
 * offset by comparing source and target again (compareEndpoints: byte by byte where either
 * side has data, nothing where both are zero).
 */
import { NbdStreamError } from './errors.js';
import type { Endpoint } from './endpoints/endpoint.js';
import { hashEndpoint, type BlkhashResult } from './blkhash.js';
import { compareEndpoints, endpointView } from './compare.js';

export interface VerifyOptions {
  requestSize?: number;
  requests?: number;
  queueSize?: number;
  /** Bytes of the target re-read so far. */
  onProgress?: (bytes: number) => void;
  /** Stops the re-reading: rejects with an AbortError. */
  signal?: AbortSignal;
}

/** Refuse, before the copy, targets that cannot be read back (pipes, null:). */
export function checkVerifiable(src: Endpoint, dst: Endpoint): void {
  if (!dst.capabilities.seekable || (dst.size === undefined && src.size !== undefined))
    throw new NbdStreamError('ERR_USAGE', `verify: the destination ${dst.name} cannot be read back`, { option: 'verify' });
}

/**
 * Check that the first `size` bytes of `dst` have the blkhash `expected` (the source's).
 * Throws ERR_VERIFY naming the destination and, when the source can be re-read, the first
 * offset where they differ.
 */
export async function verifyCopy(src: Endpoint, dst: Endpoint, size: number, expected: BlkhashResult, options: VerifyOptions = {}): Promise<BlkhashResult> {
  if (dst.size === undefined) throw new NbdStreamError('ERR_USAGE', `verify: the destination ${dst.name} cannot be read back`, { option: 'verify' });
  const io = { requestSize: options.requestSize, requests: options.requests, queueSize: options.queueSize, signal: options.signal };
  const target = endpointView(dst, size);
  const got = await hashEndpoint(target, { algorithm: expected.algorithm, blockSize: expected.blockSize, ...io, onProgress: options.onProgress });
  if (got.digest === expected.digest) return got;
  if (!src.capabilities.seekable || src.size === undefined)
    throw new NbdStreamError('ERR_VERIFY', `verify failed: the destination's blkhash ${got.digest} differs from the source's ${expected.digest}`, { endpoint: dst.name });
  const r = await compareEndpoints(endpointView(src, size), target, io);
  if (!r.identical && r.offset !== undefined)
    throw new NbdStreamError('ERR_VERIFY', 'verify failed: the destination differs from the source', { endpoint: dst.name, offset: r.offset });
  throw new NbdStreamError(
    'ERR_VERIFY',
    `verify failed: the destination's blkhash ${got.digest} differs from the source's ${expected.digest}, yet a second comparison found no difference (did the source or destination change during the copy?)`,
    { endpoint: dst.name },
  );
}
