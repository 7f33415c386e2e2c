/**
 * CLI launcher with a V8 code cache: runs the CommonJS bundle dist/nbdstream.cjs through
 * vm.Script with the cache `npm run build` wrote beside it (dist/nbdstream.cjs.v8cache), so
 * start-up skips parsing and compiling the bundle (yargs included). A missing or rejected
 * cache (another Node version) only costs that time back. The cache is never written at run
 * time unless NBDSTREAM_WRITE_CODE_CACHE=1 (the build's training run sets it);
 * NBDSTREAM_CODE_CACHE_STATUS=1 reports on stderr whether the cache was accepted.
 *
 * The bundle must not contain import(): a vm.Script has no module loader for it
 * (test/unit/bundle.test.ts checks).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as vm from 'node:vm';
import { createRequire } from 'node:module';

const file = path.join(__dirname, '..', 'nbdstream.cjs');
const cacheFile = `${file}.v8cache`;
// V8 accepts a cache for any source of the same length (it checks no content): one older than
// the bundle may hold code the bundle no longer has, and is not used
let cachedData: Buffer | undefined;
try {
  if (fs.statSync(cacheFile).mtimeMs >= fs.statSync(file).mtimeMs) cachedData = fs.readFileSync(cacheFile);
} catch {
  cachedData = undefined;
}
const script = new vm.Script(`(function (exports, require, module, __filename, __dirname) {${fs.readFileSync(file, 'utf8')}\n})`, {
  filename: file,
  cachedData,
});
if (process.env.NBDSTREAM_CODE_CACHE_STATUS === '1') process.stderr.write(`code cache ${cachedData ? (script.cachedDataRejected ? 'rejected' : 'accepted') : 'missing'}\n`);
if (process.env.NBDSTREAM_WRITE_CODE_CACHE === '1') process.on('exit', () => fs.writeFileSync(cacheFile, script.createCachedData()));
const mod = { exports: {} };
script.runInThisContext()(mod.exports, createRequire(file), mod, file, path.dirname(file));
