/**
 * The one parser for sizes given on the command line (--request-size, --queue-size, -S, serve
 * --size, compare --request-size): decimal digits, optionally followed by a unit, as libnbd and
 * nbdkit read sizes (common/utils/human-size.h): b or B (bytes), s or S (512-byte sectors), or
 * k K m M g G t T p P e E (powers of 1024), which may be followed by "B" or "iB" in any case
 * ("64M", "64MB", "64MiB" are all 64 × 2^20). nbdcopy 1.14 reads these options with
 * sscanf("%u"): plain digits mean the same there; it reads "64M" as 64 and ignores trailing text,
 * which we refuse instead. Values past 2^53 − 1 are refused (a JS number is exact up to there).
 */
import { NbdStreamError } from './errors.js';

const SIZE = /^(\d+)(?:([kmgtpe])(?:i?b)?|(b)|(s))?$/i;
const POWER = 'kmgtpe';

/** Parse `text` as a size in bytes; `what` names the option in the one-line ERR_USAGE error. */
export function parseSize(text: string, what: string): number {
  const m = SIZE.exec(text);
  if (!m) throw new NbdStreamError('ERR_USAGE', `${what}: expected a size like 65536, 64K or 64MiB, not "${text}"`);
  const scale = m[2] ? 1024n ** BigInt(POWER.indexOf(m[2].toLowerCase()) + 1) : m[4] ? 512n : 1n;
  const n = BigInt(m[1]) * scale;
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdStreamError('ERR_USAGE', `${what}: ${text} is too large (at most 2^53 - 1 bytes)`);
  return Number(n);
}
