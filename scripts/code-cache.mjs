// Build and install step: write dist/nbdstream.cjs.v8cache by running the CLI once (a small
// sparse file served by `nbdstream serve` and copied over NBD), so what a copy needs is in the
// cache. A cache holds only for the Node version (and V8 flags) that made it, so the package
// does not ship one: its install step makes it with the node that will run it. Nothing to do
// before the bundle exists (the install step of a checkout runs before `prepare` builds it).
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
// the training runs through the launcher users run, so the cache is made under its V8 flags
const cli = path.join(root, 'bin/nbdstream');
if (!fs.existsSync(path.join(root, 'dist/nbdstream.cjs'))) process.exit(0);
// V8 takes a cache for any source of the same length, so an old one could bring back code a
// rebuild replaced (a constant changed in place): the training run must start without one
fs.rmSync(path.join(root, 'dist/nbdstream.cjs.v8cache'), { force: true });
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdstream-cache-'));
try {
  const img = path.join(dir, 'img');
  const fd = fs.openSync(img, 'w');
  fs.writeSync(fd, Buffer.alloc(65536, 1), 0, 65536, 1 << 20);
  fs.ftruncateSync(fd, 4 << 20);
  fs.closeSync(fd);
  // the built-in server exports the file; the client (which writes the cache) copies it over
  // NBD to a file: the CLI, the NBD client, the streams and the file target get compiled
  const client = `NBDSTREAM_WRITE_CODE_CACHE=1 "${cli}" "$uri" "${path.join(dir, 'out')}"`;
  const env = { ...process.env, NBDSTREAM_WRITE_CODE_CACHE: '0' };
  execFileSync(cli, ['serve', '-r', '-U', '-', img, '--run', client], { env, stdio: 'ignore', timeout: 60_000 });
  if (!fs.existsSync(path.join(root, 'dist/nbdstream.cjs.v8cache'))) throw new Error('the training run wrote no cache');
} catch (err) {
  // no cache only means a slower start
  process.stderr.write(`nbdstream: code cache not written: ${err.message}\n`);
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
