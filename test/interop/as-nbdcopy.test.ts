/**
 * What the target gets is what nbdcopy sends it: the same source copied by nbdcopy and by
 * nbdstream into nbdkit eval targets that log every pwrite/zero/trim call; the sorted logs must
 * be equal, for each option that shapes them. The targets are 7 EiB (sizes up to 2^63 - 1 are
 * fine for a target: only the source's range is touched). Then the endpoints' block sizes
 * (nbdkit's blocksize-policy filter, qemu-nbd over a compressed qcow2) and sources too large
 * for JS offsets.
 */
import { describe, expect, it } from 'vitest';
import { execFile, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { evalTarget, logLines, qemuNbd, type EvalTarget } from '../helpers/servers.js';
import { dirPerFile, serversPerTest } from '../helpers/fixtures.js';
import { ok, run } from '../helpers/cli.js';

const MiB = 2 ** 20;
const KiB = 1024;
const { kit, track } = serversPerTest();
const dir = dirPerFile('nbdstream-as-nbdcopy-');

/**
 * Bytes at odd places: single bytes, a run of bytes 5000 and 70000 apart (so -S finds zero
 * blocks inside read pieces, and zero runs across piece boundaries), bytes either side of the
 * 128 MiB work range boundary.
 */
const DATA = '1 @1048575 1 @3000000 1 2 3 @0x500000 ( 1 @+5000 1 @+70000 )*40 @134217727 1 1 @140000001 7';
/** An unaligned size, with a byte in the last whole 4 KiB block before the 57-byte tail. */
const SIZE = 144 * MiB + 12345;
const DATA_TAIL = `${DATA} @${SIZE - 60} 1`;

async function copyBoth(args: string[]): Promise<{ nbdcopy: string[]; ours: string[] }> {
  const src = await kit('data', [DATA_TAIL, `size=${SIZE}`], { readOnly: true });
  const a = track(await evalTarget('7E'));
  const b = track(await evalTarget('7E'));
  await promisify(execFile)('nbdcopy', [...args, src.uri, a.uri]);
  ok(await run([...args, src.uri, b.uri]));
  return { nbdcopy: a.calls(), ours: b.calls() };
}

describe('the request log on the target equals nbdcopy 1.14 for the same copy', () => {
  const table: Array<[string, string[]]> = [
    ['defaults (256 KiB pieces, -S 4096)', []],
    ['-S 0', ['-S', '0']],
    ['--allocated (NO_HOLE zeroes, no -S)', ['--allocated']],
    ['--no-extents with 1 MiB pieces', ['--no-extents', '--request-size=1048576']],
    ['--request-size=4096 (the smallest)', ['--request-size=4096']],
    ['--request-size=33554432 (the largest) with -S 65536', ['--request-size=33554432', '-S', '65536']],
    ['-S 2097152 with 1 MiB pieces, no extents: blocks larger than a piece are never found', ['--no-extents', '--request-size=1048576', '-S', '2097152']],
  ];
  for (const [name, args] of table)
    it(name, async () => {
      const { nbdcopy, ours } = await copyBoth(args);
      expect(nbdcopy.length).toBeGreaterThan(10);
      expect(ours).toEqual(nbdcopy);
    });
});

describe('export sizes', () => {
  it('a target of 2^63 - 1 bytes is fine; -v prints its exact size', async () => {
    const src = await kit('data', ['1 @1048575 1', `size=${4 * MiB}`], { readOnly: true });
    const dst = track(await evalTarget(2n ** 63n - 1n));
    const r = await run(['-v', src.uri, dst.uri]);
    expect(r.status).toBe(0);
    expect(r.stderr).toContain(`destination ${dst.uri}: size=9223372036854775807 `);
    expect(dst.calls()).toEqual([
      'pwrite 4096 0',
      'zero 258048 4096 may_trim',
      'zero 524288 262144 may_trim',
      'zero 258048 786432 may_trim',
      'pwrite 4096 1044480',
      'zero 3145728 1048576 may_trim',
    ]);
  });

  it('a source of 2^53 bytes or more fails before any write, naming the limit', async () => {
    for (const size of [2 ** 53, 2n ** 63n - 1n]) {
      const src = await kit('null', [`${size}`], { readOnly: true });
      const dst = track(await evalTarget('8E'));
      const r = await run([src.uri, dst.uri]);
      expect(r.stderr).toBe(`nbdstream: ${src.uri}: source size ${size} is larger than 2^53 - 1 bytes, the largest source nbdstream can read\n`);
      expect(r.status).toBe(1);
      expect(dst.calls()).toEqual([]);
    }
  });
});

/** [offset, length] of every write and zero in an nbdkit log filter file. */
function logged(file: string): Array<[string, number, number]> {
  return logLines(file, ['Write', 'Zero', 'Trim'])
    .filter((l) => l.includes('count='))
    .map((l) => {
      const m = /(Write|Zero|Trim) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l)!;
      return [m[1], Number(m[2]), Number(m[3])] as [string, number, number];
    })
    .sort((x, y) => x[1] - y[1]);
}

describe("the endpoints' block sizes (as nbdcopy: request size and -S raised to the preferred block size)", () => {
  const policy = (minimum: string) => [`blocksize-minimum=${minimum}`, 'blocksize-preferred=64K', 'blocksize-error-policy=error'];

  it('a target with minimum and preferred 64 KiB gets only 64 KiB-aligned requests; -v prints the sizes in force', async () => {
    // the same bytes as above, in an export of 144 MiB: 64 KiB-aligned, so every request can be
    const src = await kit('data', [DATA, `size=${144 * MiB}`], { readOnly: true });
    for (const args of [[], ['--request-size=4096', '-S', '512'], ['--no-extents', '--request-size=4096'], ['-S', '0']]) {
      const dst = await kit('memory', [`${144 * MiB}`, ...policy('64K')], { log: true, filters: ['blocksize-policy'] });
      const r = await run(['-v', ...args, src.uri, dst.uri]);
      expect(r.status).toBe(0);
      const rs = Math.max(64 * KiB, Number((args.find((a) => a.startsWith('--request-size=')) ?? '=262144').split('=')[1]));
      const sparse = args.includes('-S') && args[args.indexOf('-S') + 1] === '0' ? 0 : 64 * KiB;
      expect(r.stderr).toMatch(new RegExp(`^nbdstream: request-size=${rs} requests=64 connections=\\d+ threads=\\d+ queue-size=${16 * MiB} sparse=${sparse}[ \n]`, 'm'));
      const calls = logged(dst.logFile!);
      expect(calls.length).toBeGreaterThan(10);
      expect(calls.filter(([, o, n]) => o % (64 * KiB) !== 0 || n % (64 * KiB) !== 0)).toEqual([]);
      await dst.stop();
    }
  });

  it('what such a target gets is what nbdcopy sends it', async () => {
    const src = await kit('data', [DATA, `size=${144 * MiB}`], { readOnly: true });
    for (const args of [[], ['--request-size=4096', '-S', '512']]) {
      const b = track(await evalTarget(144 * MiB, { filters: ['blocksize-policy'] }, policy('64K')));
      const c = track(await evalTarget(144 * MiB, { filters: ['blocksize-policy'] }, policy('64K')));
      await promisify(execFile)('nbdcopy', [...args, src.uri, b.uri]);
      ok(await run([...args, src.uri, c.uri]));
      expect(b.calls().length).toBeGreaterThan(10);
      expect(c.calls()).toEqual(b.calls());
    }
  });

  it('preferred 64 KiB alone (minimum 1): requests are 64 KiB-aligned but for the export\'s own unaligned tail', async () => {
    const src = await kit('data', [DATA_TAIL, `size=${SIZE}`], { readOnly: true });
    const dst = await kit('memory', [`${SIZE}`, ...policy('1')], { log: true, filters: ['blocksize-policy'] });
    ok(await run(['--request-size=4096', src.uri, dst.uri]));
    const calls = logged(dst.logFile!);
    const tail = SIZE - (SIZE % (64 * KiB));
    expect(calls.filter(([, o, n]) => o % (64 * KiB) !== 0 || (n % (64 * KiB) !== 0 && o + n !== SIZE))).toEqual([]);
    expect(calls[calls.length - 1]).toEqual(['Write', tail, SIZE - tail]);
  });

  it('a source with preferred 1 MiB raises the request size: 1 MiB reads, and what the target gets is what nbdcopy sends', async () => {
    const s2 = await kit('data', [DATA, `size=${SIZE}`, 'blocksize-preferred=1M'], { readOnly: true, log: true, filters: ['blocksize-policy'] });
    const b = track(await evalTarget('7E'));
    const c = track(await evalTarget('7E'));
    await promisify(execFile)('nbdcopy', ['--request-size=4096', s2.uri, b.uri]);
    fs.writeFileSync(s2.logFile!, '');
    ok(await run(['--request-size=4096', s2.uri, c.uri]));
    expect(c.calls()).toEqual(b.calls());
    const reads = logLines(s2.logFile!, ['Read']).filter((l) => l.includes('count='));
    expect(reads.length).toBeGreaterThan(0);
    expect(reads.filter((l) => !/count=0x100000 /.test(l) && !l.includes(`offset=0x${(SIZE - (SIZE % MiB)).toString(16)} `))).toEqual([]);
  });

  it('a copy onto qemu-nbd over a compressed qcow2 (minimum 64 KiB) succeeds and reads back as the source', async () => {
    const raw = path.join(dir, 'src.raw');
    const qcow = path.join(dir, 'dst.qcow2');
    // data at odd places, zero runs not 64 KiB-aligned: 4 KiB -S blocks would be refused
    const src = await kit('data', [DATA, `size=${256 * MiB}`], { readOnly: true });
    execFileSync('nbdcopy', [src.uri, raw]);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, `${256 * MiB}`]);
    const q = track(await qemuNbd(`driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename=${qcow}`, { imageOpts: true }));
    const r = await run(['-v', src.uri, q.uri]);
    expect(r.status).toBe(0);
    expect(r.stderr).toContain(`preferredBlockSize=65536 `);
    expect(r.stderr).toMatch(new RegExp(`^nbdstream: request-size=262144 requests=64 connections=\\d+ threads=\\d+ queue-size=${16 * MiB} sparse=65536\n`, 'm'));
    await q.stop();
    expect(execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, qcow]).toString()).toBe('Images are identical.\n');
  });
});
