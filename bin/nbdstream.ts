/** nbdstream command line (placeholder until the copy CLI lands). */
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const pkg = require('../../package.json') as { version: string };
const args = process.argv.slice(2);
if (args.includes('-V') || args.includes('--version')) {
  process.stdout.write(`nbdstream ${pkg.version}\n`);
  process.exit(0);
}
process.stderr.write('nbdstream: copying is not implemented yet\n');
process.exit(1);
