/**
 * Embedding nbdstream's streams: copy SOURCE to DESTINATION through a custom Transform that
 * computes the SHA-256 of the whole image on the way (zero chunks are hashed as zero bytes
 * without ever being materialised in full).
 *
 *   node dist/examples/pipeline.js SOURCE DESTINATION
 *
 * Prints "sha256 <hex>" and the copy counters.
 */
import { createHash } from 'node:crypto';
import { Transform, pipelinePromise } from 'streamx';
import { ExtentSource, Sink, ZeroDetect, openEndpoint, type Chunk } from 'nbdstream';

/** Passes chunks through unchanged, hashing the image they describe (chunks arrive in order). */
class HashTransform extends Transform {
  readonly hash = createHash('sha256');
  private next = 0;
  private static readonly zeroes = Buffer.alloc(1 << 20);

  override _transform(data: unknown, cb: (err: Error | null, out?: unknown) => void): void {
    const c = data as Chunk;
    if (c.offset !== this.next) return cb(new Error(`chunk at ${c.offset}, expected ${this.next}`));
    if (c.kind === 'data') this.hash.update(c.data!);
    else for (let left = c.length; left > 0; left -= HashTransform.zeroes.length) this.hash.update(HashTransform.zeroes.subarray(0, Math.min(left, HashTransform.zeroes.length)));
    this.next += c.length;
    cb(null, c);
  }
}

async function main(): Promise<void> {
  const [srcSpec, dstSpec] = process.argv.slice(2);
  if (!srcSpec || !dstSpec) throw new Error('usage: pipeline SOURCE DESTINATION');
  const src = await openEndpoint(srcSpec, 'source');
  const dst = await openEndpoint(dstSpec, 'target', { sourceSize: src.size });
  try {
    const source = new ExtentSource(src, { requestSize: 1 << 20 });
    const hasher = new HashTransform();
    const sink = new Sink(dst, { stats: source.stats });
    await pipelinePromise(source, hasher, new ZeroDetect(4096), sink);
    const s = source.stats;
    process.stdout.write(`sha256 ${hasher.hash.digest('hex')}\nread ${s.bytesRead} written ${s.bytesWritten} zeroed ${s.bytesZeroed} skipped ${s.bytesSkipped}\n`);
  } finally {
    await src.close();
    await dst.close();
  }
}

main().catch((err) => {
  process.stderr.write(`pipeline: ${err.message}\n`);
  process.exit(1);
});
