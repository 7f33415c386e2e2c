/**
 * Exact request logs: what nbdstream asks of the target, as the target itself records it.
 * Source: nbdkit data with bytes at 0, 1 GiB-1, 4 GiB-1 and 4 GiB (size 4 GiB+1).
 * Target: nbdkit eval logging every pwrite/zero call (or memory + log filter for big logs).
 */
import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import { evalTarget, logLines, nbdkit, type EvalTarget, type Server } from '../helpers/servers.js';
import { serversPerTest } from '../helpers/fixtures.js';
import { ok, run } from '../helpers/cli.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const SIZE = 4 * GiB + 1;
const { kit, track } = serversPerTest();

function source(): Promise<Server> {
  return kit('data', ['1 @1073741823 1 @4294967295 1 1', `size=${SIZE}`], { readOnly: true });
}

/** An eval target of SIZE bytes logging its pwrite/zero/trim calls (tracked: stopped after the test). */
async function target(): Promise<EvalTarget> {
  return track(await evalTarget(SIZE));
}

/** The expected zero calls: [from, to) cut at 128 MiB boundaries. */
function zeroes(from: number, to: number, flags: string): string[] {
  const out: string[] = [];
  for (let o = from; o < to; ) {
    const e = Math.min(to, Math.floor(o / (128 * MiB)) * 128 * MiB + 128 * MiB);
    out.push(`zero ${e - o} ${o} ${flags}`.trim());
    o = e;
  }
  return out;
}

const writes = ['pwrite 32768 0', `pwrite 32768 ${GiB - 32768}`, `pwrite 32768 ${4 * GiB - 32768}`, `pwrite 1 ${4 * GiB}`];

function expected(flags: string): string[] {
  return [
    writes[0],
    ...zeroes(32768, GiB - 32768, flags),
    writes[1],
    ...zeroes(GiB, 4 * GiB - 32768, flags),
    writes[2],
    writes[3],
  ].sort((a, b) => Number(a.split(' ')[2]) - Number(b.split(' ')[2]));
}

describe('request logs on the target', () => {
  it('writes only the pages holding data and the 1-byte tail; zeroes the rest with may_trim, split at 128 MiB', async () => {
    const src = await source();
    const dst = await target();
    const r = await run(['--request-size=32768', '-S', '0', src.uri, dst.uri]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(dst.calls()).toEqual(expected('may_trim'));
  });

  it('--allocated zeroes without may_trim', async () => {
    const src = await source();
    const dst = await target();
    const r = await run(['--allocated', '--request-size=32768', '-S', '0', src.uri, dst.uri]);
    expect(r.status).toBe(0);
    expect(dst.calls()).toEqual(expected(''));
  });

  for (const flag of ['--destination-is-zero', '--target-is-zero'])
    it(`${flag} sends no zero requests at all`, async () => {
      const src = await source();
      const dst = await target();
      const r = await run([flag, '--request-size=32768', '-S', '0', src.uri, dst.uri]);
      expect(r.status).toBe(0);
      expect(dst.calls()).toEqual(writes);
    });

  it('--no-extents reads everything and writes only full-size requests (-S 0)', async () => {
    const src = await kit('data', ['1 @1048575 1', `size=${8 * MiB}`], { readOnly: true, log: true });
    const dst = await kit('memory', [`${8 * MiB}`], { log: true });
    const r = await run(['--no-extents', '--request-size=1M', '-S', '0', src.uri, dst.uri]);
    expect(r.status).toBe(0);
    const w = logLines(dst.logFile!, ['Write']).filter((l) => l.includes('count='));
    expect(w.map((l) => /offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l)!.slice(1).map(Number)).sort((a, b) => a[0] - b[0])).toEqual(
      Array.from({ length: 8 }, (_, i) => [i * MiB, MiB]),
    );
    expect(logLines(dst.logFile!, ['Zero'])).toEqual([]);
    expect(logLines(src.logFile!, ['Extents'])).toEqual([]);
  });

  it('an all-hole source costs block status only: one connection, the export tiled by the largest requests NBD allows', async () => {
    const TiB = 2 ** 40;
    const src = await kit('data', ['', `size=${TiB}`], { readOnly: true, log: true });
    ok(await run([src.uri, 'null:']));
    const log = fs.readFileSync(src.logFile!, 'utf8');
    expect(log.match(/connection=\d+ Connect /g)).toHaveLength(1);
    expect(logLines(src.logFile!, ['Read', 'Write', 'Zero', 'Trim'])).toEqual([]);
    // 32-bit lengths, kept 64 KiB-aligned: 4 GiB - 64 KiB per request
    const max = 0xffff0000;
    const asked = logLines(src.logFile!, ['Extents'])
      .filter((l) => l.includes('count='))
      .map((l) => /offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l)!.slice(1).map(Number))
      .sort((a, b) => a[0] - b[0]);
    expect(asked).toEqual(Array.from({ length: Math.ceil(TiB / max) }, (_, i) => [i * max, Math.min(max, TiB - i * max)]));
  });

  it('extra multi-conn connections open once there is data to read', async () => {
    const src = await kit('data', ['1', `size=${GiB}`], { readOnly: true, log: true });
    ok(await run(['-T', '4', src.uri, 'null:']));
    expect(fs.readFileSync(src.logFile!, 'utf8').match(/connection=\d+ Connect /g)).toHaveLength(4);
    expect(logLines(src.logFile!, ['Read']).filter((l) => l.includes('count='))).toHaveLength(1);
  });

  it('connections: -C 4 by default, capped by -T, whose default is the processor cores (as nbdcopy)', async () => {
    const connects = async (args: string[]) => {
      const src = await kit('pattern', [`${16 * MiB}`], { readOnly: true, log: true });
      ok(await run([...args, src.uri, 'null:']));
      return fs.readFileSync(src.logFile!, 'utf8').match(/connection=\d+ Connect /g)!.length;
    };
    expect(await connects([])).toBe(Math.min(4, os.availableParallelism()));
    expect(await connects(['-T', '3'])).toBe(3);
    expect(await connects(['-T', '8', '-C', '5'])).toBe(5);
    expect(await connects(['-T', '1'])).toBe(1);
  });

  it('no NBD_CMD_READ on the wire exceeds the request size: 256 KiB by default, N with --request-size=N (as nbdcopy)', async () => {
    const reads = async (args: string[]) => {
      const src = await kit('pattern', [`${16 * MiB}`], { readOnly: true, log: true });
      ok(await run([...args, src.uri, 'null:']));
      return logLines(src.logFile!, ['Read'])
        .filter((l) => l.includes('count='))
        .map((l) => /offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l)!.slice(1).map(Number))
        .sort((a, b) => a[0] - b[0]);
    };
    const tiles = (n: number) => Array.from({ length: (16 * MiB) / n }, (_, i) => [i * n, n]);
    expect(await reads([])).toEqual(tiles(256 * 1024));
    expect(await reads(['--request-size=64K'])).toEqual(tiles(64 * 1024));
    expect(await reads(['--request-size=1M'])).toEqual(tiles(MiB));
    expect(await reads(['--request-size=8M'])).toEqual(tiles(8 * MiB));
  });

  it('-S turns zero blocks inside read pieces into zero requests', async () => {
    // 1 MiB of data extent whose second half is zero bytes
    const src = await kit('data', ['1 @524287 1', `size=${MiB}`], { readOnly: true, filters: ['noextents'] });
    const dst = await kit('memory', [`${MiB}`], { log: true });
    const r = await run(['--request-size=1M', '-S', '65536', src.uri, dst.uri]);
    expect(r.status).toBe(0);
    const calls = logLines(dst.logFile!, ['Write', 'Zero'])
      .filter((l) => l.includes('count='))
      .map((l) => /(Write|Zero) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l)!.slice(1))
      .map(([k, o, c]) => `${k} ${Number(o)}+${Number(c)}`)
      .sort((a, b) => Number(a.split(' ')[1].split('+')[0]) - Number(b.split(' ')[1].split('+')[0]));
    expect(calls).toEqual(['Write 0+65536', 'Zero 65536+393216', 'Write 458752+65536', 'Zero 524288+524288']);
  });
});
