/**
 * Node built-in modules that only some runs need, loaded on first use: together they cost
 * several milliseconds of start-up that a plain copy should not pay (node:tls alone loads
 * node:crypto and a dozen internal modules; node:net loads node:stream: `--version` and file
 * copies need neither). They are loaded with require() because the CLI
 * bundle runs in a vm.Script, which has no module loader (bin/launch.cts).
 */
import { createRequire } from 'node:module';

const nodeRequire = createRequire(import.meta.url);

export const nodeNet = (): typeof import('node:net') => nodeRequire('node:net');
export const nodeTls = (): typeof import('node:tls') => nodeRequire('node:tls');
export const nodeCrypto = (): typeof import('node:crypto') => nodeRequire('node:crypto');
export const nodeZlib = (): typeof import('node:zlib') => nodeRequire('node:zlib');
export const nodeFsPromises = (): typeof import('node:fs/promises') => nodeRequire('node:fs/promises');
export const nodeChildProcess = (): typeof import('node:child_process') => nodeRequire('node:child_process');
