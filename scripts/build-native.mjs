// Install step (`npm install` of the package, `npm ci` of a checkout, `npm rebuild nbdstream`):
// build the native addon in native/ with node-gyp. When it cannot be built (no C compiler, no
// Python, no Node headers) the package still works on its JS fallback: this prints one line
// saying so, keeps node-gyp's output in native/build.log, and exits 0 so the install succeeds.
//
// node-gyp: the one npm runs scripts with (npm_config_node_gyp, npm's own node-gyp), else one
// on PATH (yarn, pnpm), else the one inside the npm next to this node. Node's headers come
// from the configured nodedir (npm_config_nodedir), else from node's own installation prefix
// when it has this version's (a distribution's node, whose built-in prefix node-gyp does not
// trust), else node-gyp downloads them (which fails offline: the JS fallback again).
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const log = path.join(root, 'native', 'build.log');

function nodeGyp() {
  const js = process.env.npm_config_node_gyp;
  if (js && fs.existsSync(js)) return [process.execPath, js];
  const bundled = path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
  const onPath = spawnSync('node-gyp', ['--version'], { stdio: 'ignore' }).status === 0;
  if (onPath) return ['node-gyp'];
  if (fs.existsSync(bundled)) return [process.execPath, bundled];
  return undefined;
}

function nodeDir() {
  if (process.env.npm_config_nodedir) return [];
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  try {
    const h = fs.readFileSync(path.join(prefix, 'include', 'node', 'node_version.h'), 'utf8');
    const v = ['MAJOR', 'MINOR', 'PATCH'].map((k) => h.match(new RegExp(`#define NODE_${k}_VERSION (\\d+)`))?.[1]).join('.');
    return v === process.versions.node ? [`--nodedir=${prefix}`] : [];
  } catch {
    return [];
  }
}

/** What went wrong, on one line. */
function cause(output) {
  const lines = output.split('\n');
  // the compiler's "error:", make's or gyp's (Python) missing program
  const compiler = lines.find((l) => (/\berror\b/i.test(l) && !/^(gyp|make)\b/.test(l)) || /^make: .*: No such file or directory$/.test(l) || /^[A-Z]\w*Error: /.test(l));
  if (compiler) return compiler.trim();
  // node-gyp: "gyp ERR! stack Error: ..." continued on "gyp ERR! stack" lines up to the trace
  const start = lines.findIndex((l) => /^gyp ERR! stack \w*Error/.test(l));
  if (start < 0) return lines.find((l) => l.startsWith('gyp ERR!'))?.replace(/^gyp ERR! /, '');
  const message = [];
  for (const l of lines.slice(start)) {
    if (!l.startsWith('gyp ERR! stack ') || /^gyp ERR! stack\s+at /.test(l)) break;
    message.push(l.slice('gyp ERR! stack '.length).trim());
  }
  return message.join(' ');
}

function fallback(reason) {
  process.stderr.write(`nbdstream: native addon not built (${reason}); using the JS fallback: files are read densely, NBD replies are received on the JS thread\n`);
  process.exit(0);
}

fs.rmSync(log, { force: true });
if (process.platform !== 'linux') fallback(`not supported on ${process.platform}`);
if (process.env.NBDSTREAM_NATIVE === '0') fallback('NBDSTREAM_NATIVE=0');
const gyp = nodeGyp();
if (!gyp) fallback('node-gyp not found');
const [cmd, ...args] = gyp;
const r = spawnSync(cmd, [...args, 'rebuild', '--directory=native', ...nodeDir()], { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
if (r.status === 0) process.exit(0);
const output = `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? `${r.error.message}\n` : ''}`;
fs.writeFileSync(log, output);
fallback(`${cause(output) ?? `node-gyp exited with ${r.status ?? r.signal}`}; node-gyp's output: ${log}`);
