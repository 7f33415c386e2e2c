// Bundles built by `npm run bundle` (after tsc): the CLI as one CommonJS file (started through
// dist/bin/launch.cjs with a V8 code cache) and the library as one ES module (package entry).
const quiet = (level, log, handler) => {
  // yargs' `extends` option uses import.meta.resolve; nbdstream does not use it
  if (log.code === 'EMPTY_IMPORT_META') return;
  handler(level, log);
};
// string-width (yargs' help layout; three copies) builds an Intl.Segmenter and Unicode-property
// regular expressions when loaded: ICU work costing 20-50 ms of every start-up here, though
// only --help uses them. Build each on first use instead.
const LAZY_REGEXP = `function lazyRegExp(make) {
  let re;
  const real = () => (re ??= make());
  return new Proxy({}, {
    get: (_, k) => { const r = real(); const v = r[k]; return typeof v === 'function' ? v.bind(r) : v; },
    set: (_, k, v) => { real()[k] = v; return true; },
  });
}
`;
const lazyStringWidth = {
  name: 'lazy-string-width',
  transform(code, id) {
    if (!/[\\/]string-width[\\/]index\.js$/.test(id)) return null;
    const out = code
      .replace('const segmenter = new Intl.Segmenter();', 'let segmenterInstance;\nconst segmenter = { segment: (s) => (segmenterInstance ??= new Intl.Segmenter()).segment(s) };')
      .replace(/^const (\w+) = (\/.*\\p\{.*\/[a-z]*);$/gm, 'const $1 = lazyRegExp(() => $2);');
    return out === code ? null : `${out}\n${LAZY_REGEXP}`;
  },
};
// Two start-up costs of yargs that nbdstream does not need, and one side effect:
// - its platform shim imports node:assert (3-4 ms: a dozen internal modules) for two invariant
//   checks; the same checks, written out, throw ERR_ASSERTION errors;
// - every instance guesses a default --version by reading package.json files upwards from the
//   current directory (a readdir per level); nbdstream's commands all set .version() themselves;
// - its platform shim reads process.stdout.columns when loaded, which creates Node's stdout
//   stream: on a pipe that sets O_NONBLOCK on the pipe, shared with whatever else writes to it
//   (`( nbdstream serve … & nbdcopy … - ) | …` then fails with EAGAIN). Read it when asked.
const ASSERT_CHECKS = `const assertionError = (message) => Object.assign(new Error(message), { code: 'ERR_ASSERTION' });
const notStrictEqual = (actual, expected, message) => {
  if (Object.is(actual, expected)) throw assertionError(message ?? 'Expected values to be strictly unequal: ' + String(actual));
};
const strictEqual = (actual, expected, message) => {
  if (!Object.is(actual, expected)) throw assertionError(message ?? 'Expected values to be strictly equal: ' + String(actual) + ' !== ' + String(expected));
};`;
const YARGS_EDITS = [
  { file: /[\\/]yargs[\\/]lib[\\/]platform-shims[\\/]esm\.mjs$/, from: "import { notStrictEqual, strictEqual } from 'assert'", to: ASSERT_CHECKS },
  {
    file: /[\\/]yargs[\\/]lib[\\/]platform-shims[\\/]esm\.mjs$/,
    from: "stdColumns: typeof process.stdout.columns !== 'undefined' ? process.stdout.columns : null",
    to: "get stdColumns() { return typeof process.stdout.columns !== 'undefined' ? process.stdout.columns : null; }",
  },
  { file: /[\\/]yargs[\\/]build[\\/]lib[\\/]yargs-factory\.js$/, from: '        yargs.version();\n', to: '        yargs.version(false);\n' },
];
const yargsStartUp = {
  name: 'yargs-start-up',
  transform(code, id) {
    const edits = YARGS_EDITS.filter((e) => e.file.test(id));
    if (!edits.length) return null;
    let out = code;
    for (const edit of edits) {
      const next = out.replace(edit.from, edit.to);
      // a yargs update that moved the code fails the build rather than silently undoing this
      if (next === out) throw new Error(`yargs-start-up: ${JSON.stringify(edit.from)} not found in ${id}`);
      out = next;
    }
    return out;
  },
};
export default [
  {
    input: 'dist/bin/nbdstream.js',
    platform: 'node',
    onLog: quiet,
    plugins: [lazyStringWidth, yargsStartUp],
    output: { file: 'dist/nbdstream.cjs', format: 'cjs', codeSplitting: false },
  },
  {
    input: 'dist/lib/index.js',
    platform: 'node',
    onLog: quiet,
    output: { file: 'dist/nbdstream.lib.mjs', format: 'esm', codeSplitting: false },
  },
];
