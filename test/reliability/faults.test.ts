/**
 * Fault matrix: every fault the built-in server can inject, nbdkit's error and delay filters,
 * and servers killed mid-copy. Each copy must either finish with a byte-identical target or
 * fail with one coded, one-line error naming the endpoint — in bounded time. Never success with
 * wrong data, never a hang, never an uncoded error.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { copy } from '../../lib/copy.js';
import { NbdStreamError } from '../../lib/errors.js';
import { MemoryEndpoint } from '../../lib/endpoints/memory.js';
import { NBD_ESHUTDOWN, NbdServer, type ServerFaults, type Violation } from '../../lib/nbd/server.js';
import { nbdkit, tmpDir, type Server } from '../helpers/servers.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;
const dir = tmpDir('nbdstream-faults-');
const table: string[] = [];
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
  // the fault table for the issue note
  process.stdout.write(`\nfault class | case | outcome | ms\n${table.join('\n')}\n`);
});

/** A 16 MiB image: random data with zero ranges (reported as such by extents). */
function image(): { buf: Buffer; zeroes: { offset: number; length: number }[] } {
  const buf = randomBytes(SIZE);
  const zeroes = [
    { offset: 2 * MiB, length: 3 * MiB },
    { offset: 9 * MiB, length: 4 * MiB },
  ];
  for (const z of zeroes) buf.fill(0, z.offset, z.offset + z.length);
  return { buf, zeroes };
}
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

type Outcome = 'identical' | 'clean error';

/** Run a copy with a deadline and classify it; anything else fails the test. */
async function outcome(klass: string, name: string, run: () => Promise<Buffer | undefined>, want: Buffer): Promise<Outcome> {
  const t = Date.now();
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`HANG: ${klass} ${name} did not finish in 20 s`)), 20_000);
  });
  let result: Outcome;
  try {
    const target = await Promise.race([run(), deadline]);
    if (target === undefined) throw new Error('no target to check');
    if (sha(target) !== sha(want)) throw new Error(`WRONG DATA: ${klass} ${name} reported success with a different target`);
    result = 'identical';
  } catch (err) {
    if (String((err as Error).message).startsWith('HANG') || String((err as Error).message).startsWith('WRONG')) throw err;
    if (!(err instanceof NbdStreamError)) throw new Error(`UNCODED: ${klass} ${name}: ${(err as Error)?.stack ?? err}`);
    const line = err.describe();
    expect(line).not.toContain('\n');
    expect(err.endpoint).toBeTruthy();
    result = 'clean error';
  } finally {
    clearTimeout(timer);
  }
  table.push(`${klass} | ${name} | ${result} | ${Date.now() - t}`);
  return result;
}

async function serve(ep: MemoryEndpoint, faults: ServerFaults): Promise<NbdServer> {
  const s = new NbdServer(ep, { faults });
  await s.listen({ path: path.join(dir, `s${Math.random().toString(36).slice(2)}.sock`) });
  return s;
}

/** Copy from our server (with faults) into memory. */
async function fromFaultySource(faults: ServerFaults, opts = {}): Promise<{ target: Buffer | undefined; want: Buffer; run: () => Promise<Buffer | undefined> }> {
  const { buf, zeroes } = image();
  const server = await serve(new MemoryEndpoint(Buffer.from(buf), 'src', zeroes), faults);
  const dst = new MemoryEndpoint(Buffer.alloc(SIZE, 0x77), 'dst');
  return {
    target: undefined,
    want: buf,
    run: async () => {
      try {
        await copy(server.uri!, dst, { timeout: 3, requestSize: 256 * 1024, ...opts });
        return dst.buffer;
      } finally {
        await server.close(100);
      }
    },
  };
}

/** Copy from memory into our server (with faults). */
async function toFaultyTarget(faults: ServerFaults): Promise<{ want: Buffer; run: () => Promise<Buffer | undefined> }> {
  const { buf, zeroes } = image();
  const target = new MemoryEndpoint(Buffer.alloc(SIZE, 0x77), 'dst');
  const server = await serve(target, faults);
  return {
    want: buf,
    run: async () => {
      try {
        await copy(new MemoryEndpoint(buf, 'src', zeroes), server.uri!, { timeout: 3 });
        return target.buffer;
      } finally {
        await server.close(100);
      }
    },
  };
}

const EIO = 5;
describe('fault matrix (built-in server)', () => {
  const sourceFaults: Array<[string, ServerFaults, Outcome | undefined]> = [
    ['read error at 15 MiB', { readError: (o, l) => (o <= 15 * MiB && 15 * MiB < o + l ? EIO : undefined) }, 'clean error'],
    ['read error inside a zero extent (never read)', { readError: (o, l) => (o <= 10 * MiB && 10 * MiB < o + l ? EIO : undefined) }, 'identical'],
    ['read error on every read', { readError: () => EIO }, 'clean error'],
    ['block status error (copied as data)', { blockStatusError: () => EIO }, 'identical'],
    ['delay 20 ms per request', { delayMs: 20 }, 'identical'],
    ['connection cut after 1 MiB, no retries', { closeAfterBytes: MiB }, 'clean error'],
  ];
  for (const [name, faults, expected] of sourceFaults)
    it(`source: ${name}`, async () => {
      const c = await fromFaultySource(faults);
      expect(await outcome('server fault (source)', name, c.run, c.want)).toBe(expected);
    });

  it('source: connection cut after 6 MiB on every connection, --retries 8: completes identical', async () => {
    const c = await fromFaultySource({ closeAfterBytes: 6 * MiB }, { retries: 8, connections: 1 });
    expect(await outcome('server fault (source)', 'cut every 6 MiB, retries=8', c.run, c.want)).toBe('identical');
  });

  it('source: NBD_ESHUTDOWN (server going away) to the first reads, --retries 3: reconnects once, completes identical', async () => {
    const { buf, zeroes } = image();
    let shutdowns = 3;
    const server = await serve(new MemoryEndpoint(Buffer.from(buf), 'src', zeroes), { readError: () => (shutdowns-- > 0 ? NBD_ESHUTDOWN : undefined) });
    let connections = 0;
    server.on('connection', () => connections++);
    const dst = new MemoryEndpoint(Buffer.alloc(SIZE, 0x77), 'dst');
    try {
      await copy(server.uri!, dst, { retries: 3, connections: 1, requestSize: 256 * 1024 });
    } finally {
      await server.close(100);
    }
    expect(sha(dst.buffer)).toBe(sha(buf));
    expect(connections).toBe(2);
  });

  const violations: Violation[] = ['wrong-cookie', 'chunk-past-request', 'zero-length-extent', 'overlong-extent', 'bad-magic', 'truncated-header', 'oversized-payload', 'unasked-context', 'simple-after-structured', 'repeated-chunk', 'hole-over-data'];
  for (const v of violations)
    it(`source: protocol violation ${v}`, async () => {
      const c = await fromFaultySource({ violation: v });
      // block status violations only break extents, which are not fatal: the copy may still be right
      const r = await outcome('protocol violation', v, c.run, c.want);
      expect(['clean error', 'identical']).toContain(r);
      if (!['zero-length-extent', 'overlong-extent', 'unasked-context'].includes(v)) expect(r).toBe('clean error');
    });

  const targetFaults: Array<[string, ServerFaults]> = [
    ['write error at 1 MiB', { writeError: (o, l) => (o <= MiB && MiB < o + l ? EIO : undefined) }],
    ['zero error', { zeroError: () => EIO }],
    ['connection cut after 40 bytes of replies', { closeAfterBytes: 40 }],
  ];
  for (const [name, faults] of targetFaults)
    it(`target: ${name}`, async () => {
      const c = await toFaultyTarget(faults);
      expect(await outcome('server fault (target)', name, c.run, c.want)).toBe('clean error');
    });
});

describe('fault matrix (nbdkit filters, killed servers)', () => {
  async function viaNbdkit(klass: string, name: string, args: string[], filters: string[], expected: Outcome | Outcome[], kill?: number): Promise<void> {
    const file = path.join(dir, `src-${Math.random().toString(36).slice(2)}.img`);
    const { buf } = image();
    fs.writeFileSync(file, buf);
    const s: Server = await nbdkit('file', [file, ...args], { readOnly: true, filters });
    const dst = new MemoryEndpoint(Buffer.alloc(SIZE, 0x77), 'dst');
    try {
      if (kill !== undefined) setTimeout(() => s.proc!.kill('SIGKILL'), kill);
      const r = await outcome(klass, name, async () => (await copy(s.uri, dst, { timeout: 3, requestSize: 65536, requests: 4 }), dst.buffer), buf);
      expect(Array.isArray(expected) ? expected : [expected]).toContain(r);
    } finally {
      await s.stop();
    }
  }
  it('nbdkit error filter: every read fails', () => viaNbdkit('nbdkit error filter', 'error-pread-rate=1', ['error-pread-rate=1'], ['error'], 'clean error'));
  for (let i = 0; i < 3; i++)
    it(`nbdkit error filter: half the reads fail (run ${i + 1})`, () =>
      viaNbdkit('nbdkit error filter', `error-pread-rate=0.5 #${i + 1}`, ['error-pread-rate=0.5'], ['error'], ['clean error', 'identical']));
  it('nbdkit error filter: every extents call fails (copied as data)', () => viaNbdkit('nbdkit error filter', 'error-extents-rate=1', ['error-extents-rate=1'], ['error'], 'identical'));
  it('nbdkit delay filter', () => viaNbdkit('nbdkit delay filter', 'rdelay=10ms', ['rdelay=10ms'], ['delay'], 'identical'));
  for (const ms of [5, 40, 120, 300])
    it(`nbdkit killed (SIGKILL) ${ms} ms into the copy`, () =>
      viaNbdkit('server killed', `SIGKILL at ${ms} ms`, ['rdelay=5ms'], ['delay'], ['clean error', 'identical'], ms));
});
