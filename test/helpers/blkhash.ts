/**
 * An independent blkhash for tests: python3's hashlib, cutting the image into BLOCKSIZE blocks
 * (the last one at its real length) and hashing the concatenated block digests followed by the
 * image length as a little-endian 64-bit integer. The image is streamed (1 MiB reads), so
 * large exports piped from nbdcopy need no memory. Written from the definition only; it shares
 * no code with lib/blkhash.ts.
 */
import { execFileSync } from 'node:child_process';

const SCRIPT = `
import hashlib, json, struct, sys
path, specs = sys.argv[1], [s.split('/') for s in sys.argv[2:]]
f = sys.stdin.buffer if path == '-' else open(path, 'rb')
outer = [hashlib.new(alg) for alg, bs in specs]
pending = [b''] * len(specs)
length = 0
while True:
    buf = f.read(1 << 20)
    if not buf:
        break
    length += len(buf)
    for i, (alg, bs) in enumerate(specs):
        bs = int(bs)
        data = pending[i] + buf
        whole = len(data) - len(data) % bs
        for off in range(0, whole, bs):
            outer[i].update(hashlib.new(alg, data[off:off + bs]).digest())
        pending[i] = data[whole:]
out = {}
for i, (alg, bs) in enumerate(specs):
    if pending[i]:
        outer[i].update(hashlib.new(alg, pending[i]).digest())
    outer[i].update(struct.pack('<Q', length))
    out[alg + '/' + bs] = outer[i].hexdigest()
print(json.dumps(out))
`;

/** {"ALG/BLOCKSIZE": hex} for the file (or, with path "-", for `input`). */
export function pyBlkhash(path: string, specs: string[], input?: Buffer): Record<string, string> {
  const out = execFileSync('python3', ['-c', SCRIPT, path, ...specs], { input, maxBuffer: 1 << 20 });
  return JSON.parse(out.toString()) as Record<string, string>;
}

/** Same, for an NBD export read by nbdcopy (libnbd) into python's stdin. */
export function pyBlkhashNbd(uri: string, specs: string[]): Record<string, string> {
  const py = ['python3', '-c', SCRIPT, '-', ...specs].map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
  const out = execFileSync('sh', ['-c', `nbdcopy "$1" - | ${py}`, 'sh', uri], { maxBuffer: 1 << 20 });
  return JSON.parse(out.toString()) as Record<string, string>;
}
