/**
 * Read a whole NBD export into a small set of reused buffers and report the throughput.
 *
 *   node dist/examples/read-export.js URI [REQUEST_SIZE] [REQUESTS] [CONNECTIONS]
 *
 * Prints one line: "<bytes> bytes in <seconds> s (<MB/s> MB/s), sha256 <hex>" when
 * NBDSTREAM_HASH=1, otherwise without the hash. Each buffer is reused as soon as its read
 * completes, so memory stays at REQUESTS × REQUEST_SIZE.
 */
import { createHash } from 'node:crypto';
import { NbdClient } from 'nbdstream';

async function main(): Promise<void> {
  const [uri, sizeArg, reqArg, connArg] = process.argv.slice(2);
  if (!uri) throw new Error('usage: read-export URI [REQUEST_SIZE] [REQUESTS] [CONNECTIONS]');
  const requestSize = Number(sizeArg ?? 256 * 1024);
  const requests = Number(reqArg ?? 16);
  const hash = process.env.NBDSTREAM_HASH === '1' ? createHash('sha256') : undefined;

  const client = await NbdClient.connect(uri, { maxRequests: requests, connections: Number(connArg ?? 4) });
  const size = client.size;
  const start = process.hrtime.bigint();
  let next = 0; // next offset to request
  let done = 0; // bytes completed in order (for hashing in order)
  const finished = new Map<number, Buffer>();

  // One worker per buffer: read, hand over (in order when hashing), read the next piece.
  async function worker(buf: Buffer): Promise<void> {
    while (next < size) {
      const offset = next;
      const length = Math.min(requestSize, size - offset);
      next += length;
      const { data } = await client.pread(offset, length, buf);
      if (!hash) continue;
      finished.set(offset, Buffer.from(data)); // copy: only when hashing
      while (finished.has(done)) {
        const b = finished.get(done)!;
        finished.delete(done);
        hash.update(b);
        done += b.length;
      }
    }
  }
  await Promise.all(Array.from({ length: requests }, () => worker(Buffer.allocUnsafe(requestSize))));
  const secs = Number(process.hrtime.bigint() - start) / 1e9;
  await client.close();
  const line = `${size} bytes in ${secs.toFixed(3)} s (${(size / secs / 1e6).toFixed(0)} MB/s)`;
  process.stdout.write(hash ? `${line}, sha256 ${hash.digest('hex')}\n` : `${line}\n`);
}

main().catch((err) => {
  process.stderr.write(`read-export: ${err.message}\n`);
  process.exit(1);
});
