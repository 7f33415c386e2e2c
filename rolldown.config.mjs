// Bundles built by `npm run bundle` (after tsc): the CLI as one CommonJS file (started through
// dist/bin/launch.cjs with a V8 code cache) and the library as one ES module (package entry).
const quiet = (level, log, handler) => {
  // yargs' `extends` option uses import.meta.resolve; nbdstream does not use it
  if (log.code === 'EMPTY_IMPORT_META') return;
  handler(level, log);
};
export default [
  {
    input: 'dist/bin/nbdstream.js',
    platform: 'node',
    onLog: quiet,
    output: { file: 'dist/nbdstream.cjs', format: 'cjs', codeSplitting: false },
  },
  {
    input: 'dist/lib/index.js',
    platform: 'node',
    onLog: quiet,
    output: { file: 'dist/nbdstream.lib.mjs', format: 'esm', codeSplitting: false },
  },
];
