/** Reading TLS key material (client and server side): psktool files and PEM files. */
import * as fs from 'node:fs';
import { NbdStreamError } from '../errors.js';

export function tlsError(message: string, cause?: unknown): NbdStreamError {
  return new NbdStreamError('ERR_TLS', message, { cause });
}

/** A file's bytes; a missing or unreadable file is an ERR_TLS naming `what` and the path. */
export function readTlsFile(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw tlsError(`cannot read ${what} ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, err);
  }
}

/** All `user:hexkey` entries of a psktool file (blank lines allowed, anything else malformed). */
export function readPskFile(file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const text = readTlsFile(file, 'PSK file').toString('utf8');
  text.split(/\r?\n/).forEach((line, i) => {
    if (line.trim() === '') return;
    const colon = line.indexOf(':');
    const hex = colon < 0 ? '' : line.slice(colon + 1).trim();
    if (colon <= 0 || !/^([0-9a-fA-F]{2})+$/.test(hex)) throw tlsError(`PSK file ${file}: line ${i + 1} is not "user:hexkey"`);
    keys.set(line.slice(0, colon), Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw tlsError(`PSK file ${file} has no keys`);
  return keys;
}
