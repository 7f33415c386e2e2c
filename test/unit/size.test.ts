/**
 * lib/size.ts: the one size parser of the CLI, serve and compare. Units as libnbd's and nbdkit's
 * human-size parser reads them (checked against nbdkit 1.32's `memory SIZE`), plus the "B" and
 * "iB" spellings. nbdcopy 1.14 reads --request-size, --queue-size and -S with sscanf("%u"): plain
 * digits mean the same there; the comments say what it makes of the other forms (tried here).
 */
import { describe, expect, it } from 'vitest';
import { parseSize } from '../../lib/size.js';

const K = 1024;
const accepted: Array<[string, number]> = [
  ['0', 0],
  ['00', 0],
  ['007', 7],
  ['65536', 65536],
  ['33554432', 32 * K * K],
  ['9007199254740991', Number.MAX_SAFE_INTEGER], // nbdcopy: 4294967295 (unsigned int)
  ['64b', 64],
  ['64B', 64],
  ['128s', 65536], // 512-byte sectors; nbdcopy: 128
  ['128S', 65536],
  ['64k', 64 * K], // nbdcopy: 64
  ['64K', 64 * K],
  ['64KB', 64 * K],
  ['64kb', 64 * K],
  ['64KiB', 64 * K],
  ['64kib', 64 * K],
  ['1m', K ** 2],
  ['1M', K ** 2],
  ['64MiB', 64 * K ** 2], // nbdcopy: 64
  ['1g', K ** 3],
  ['2G', 2 * K ** 3],
  ['1GiB', K ** 3],
  ['1t', K ** 4],
  ['1T', K ** 4], // nbdcopy: 1
  ['1TB', K ** 4],
  ['8191T', 8191 * K ** 4], // just below 2^53
  ['1P', K ** 5],
  ['7p', 7 * K ** 5],
];

const refused: Array<[string, string]> = [
  ['', 'expected a size'], // nbdcopy: "could not parse"
  ['lots', 'expected a size'],
  [' 65536', 'expected a size'], // nbdcopy: 65536 (sscanf skips blanks)
  ['+65536', 'expected a size'], // nbdcopy: 65536
  ['-0', 'expected a size'], // nbdcopy: 0
  ['0x10000', 'expected a size'], // nbdcopy: 0
  ['65536x', 'expected a size'], // nbdcopy: 65536 (trailing text ignored)
  ['1.5M', 'expected a size'], // nbdcopy: 1
  ['64Ki', 'expected a size'],
  ['64k0', 'expected a size'],
  ['64KiBB', 'expected a size'],
  ['1MiB ', 'expected a size'],
  ['9007199254740992', 'is too large (at most 2^53 - 1 bytes)'],
  ['8192T', 'is too large (at most 2^53 - 1 bytes)'], // 2^53
  ['1E', 'is too large (at most 2^53 - 1 bytes)'],
  ['99999999999999999999G', 'is too large (at most 2^53 - 1 bytes)'], // nbdcopy: accepted (wraps)
];

describe('parseSize', () => {
  it.each(accepted)('%s = %d bytes', (text, value) => {
    expect(parseSize(text, '--queue-size')).toBe(value);
  });
  it.each(refused)('refuses "%s": %s', (text, why) => {
    const expected = why === 'expected a size' ? `--queue-size: expected a size like 65536, 64K or 64MiB, not "${text}"` : `--queue-size: ${text} ${why}`;
    expect(() => parseSize(text, '--queue-size')).toThrow(expect.objectContaining({ code: 'ERR_USAGE', message: expected }));
  });
});
