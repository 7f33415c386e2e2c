import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RESUME_MAGIC, ResumeState, checkSame, decodeState, encodeDone, encodeHeader, encodeRecord, type ResumeHeader } from '../../lib/resume.js';
import { dirPerFile } from '../helpers/fixtures.js';
import type { Endpoint } from '../../lib/endpoints/endpoint.js';
import { ExtentSource } from '../../lib/streams/extent-source.js';
import { Sink } from '../../lib/streams/sink.js';

const WR = 128 * 1024 * 1024;
const header: ResumeHeader = { source: 'nbd://a/x', sourceSize: 3 * WR + 5, target: 'out.img', targetSize: 3 * WR + 5, targetId: 'file 1:2' };
const dir = dirPerFile('nbdstream-resume-unit-');

describe('state file records', () => {
  it('each line is TEXT and the first 8 hex digits of its sha256', () => {
    expect(encodeRecord('done 0 134217728')).toBe('done 0 134217728 ba79dac3\n');
    expect(encodeHeader(header).startsWith(`${RESUME_MAGIC} {"source":"nbd://a/x"`)).toBe(true);
  });

  it('decodes the header and the done ranges', () => {
    const text = encodeHeader(header) + encodeDone(0, 2 * WR) + encodeDone(3 * WR, 5);
    expect(decodeState(text)).toEqual({ header, done: [{ offset: 0, length: 2 * WR }, { offset: 3 * WR, length: 5 }], bad: 0 });
  });

  it('ignores a torn last record, cut at every byte', () => {
    const good = encodeHeader(header) + encodeDone(0, WR);
    const last = encodeDone(WR, WR);
    for (let i = 0; i < last.length; i++) {
      const r = decodeState(good + last.slice(0, i));
      expect(r.done).toEqual([{ offset: 0, length: WR }]);
      expect(r.bad).toBe(i === 0 ? 0 : 1);
    }
    expect(decodeState(good + last).done).toHaveLength(2);
  });

  it('ignores records whose check fails, and unaligned ranges', () => {
    const text = encodeHeader(header) + 'done 0 134217728 ba79dac4\n' + encodeDone(5, WR) + 'garbage\n' + encodeDone(WR, WR);
    expect(decodeState(text)).toEqual({ header, done: [{ offset: WR, length: WR }], bad: 3 });
  });

  it('a torn header holds nothing; a file not starting with the magic is refused', () => {
    const h = encodeHeader(header);
    expect(decodeState(h.slice(0, 40))).toEqual({ header: undefined, done: [], bad: 1 });
    expect(decodeState('')).toEqual({ header: undefined, done: [], bad: 0 });
    expect(() => decodeState('QFI\xfb...', 'disk.img')).toThrow('--resume: not an nbdstream state file (refusing to overwrite it)');
  });

  it('names the first field that differs', () => {
    expect(() => checkSame(header, { ...header, sourceSize: 7 }, 'source', 'st')).toThrow(
      `--resume: not resuming: the source's size is 7, the state file says ${3 * WR + 5} (delete the state file to copy everything again)`,
    );
    expect(() => checkSame(header, { ...header, targetId: undefined }, 'target', 'st')).toThrow('the destination file (device:inode) is none, the state file says file 1:2');
    expect(() => checkSame(header, { ...header, targetSize: 1 }, 'source', 'st')).not.toThrow();
  });
});

describe('ResumeState on a real file', () => {
  const ep = (name: string, size: number): Endpoint => ({ name, size, capabilities: { seekable: true } }) as unknown as Endpoint;

  it('writes the header, appends merged ranges, rereads them, and drops a torn tail on begin', async () => {
    const file = path.join(dir, 'st1');
    const src = ep('nbd://a/x', 3 * WR + 5);
    const dst = ep('out.img', 3 * WR + 5);
    const s1 = await ResumeState.open(file, src);
    expect(s1.resuming).toBe(false);
    await s1.begin(src, dst);
    await s1.add([0, WR]);
    await s1.add([3 * WR]);
    await s1.close();
    const { header: h, ...rest } = decodeState(fs.readFileSync(file, 'utf8'));
    expect(h).toEqual({ source: 'nbd://a/x', sourceSize: 3 * WR + 5, target: 'out.img', targetSize: 3 * WR + 5 });
    expect(rest).toEqual({ done: [{ offset: 0, length: 2 * WR }, { offset: 3 * WR, length: 5 }], bad: 0 });

    fs.appendFileSync(file, 'done 2684');
    const s2 = await ResumeState.open(file, src);
    expect(s2.resuming).toBe(true);
    expect([...s2.done]).toEqual([0, WR, 3 * WR]);
    expect(s2.resumedBytes).toBe(2 * WR + 5);
    await s2.begin(src, dst);
    await s2.add([2 * WR]);
    await s2.remove();
    expect(fs.existsSync(file)).toBe(false);
  });

  it('refuses another source before reading further, and another target at begin', async () => {
    const file = path.join(dir, 'st2');
    fs.writeFileSync(file, encodeHeader(header));
    await expect(ResumeState.open(file, ep('nbd://a/x', 99))).rejects.toThrow(`the source's size is 99, the state file says ${3 * WR + 5}`);
    const s = await ResumeState.open(file, ep('nbd://a/x', 3 * WR + 5));
    await expect(s.begin(ep('nbd://a/x', 3 * WR + 5), ep('other.img', 3 * WR + 5))).rejects.toThrow("the destination's name is other.img, the state file says out.img");
    expect(fs.readFileSync(file, 'utf8')).toBe(encodeHeader(header));
  });
});

describe('the pipeline parts --resume uses', () => {
  const caps = { canExtents: true, canZero: true, canFastZero: false, canTrim: false, canFlush: true, canMultiConn: false, preferredBlockSize: 4096, maxRequest: 32 * 1024 * 1024, isZeroInitialised: false, seekable: true, readOnly: false };

  it('ExtentSource: a skipped work range yields no chunks; a zero run ends before it', async () => {
    const size = 4 * WR + 5;
    const asked: number[] = [];
    // data in the first 4 KiB of each work range, zeroes elsewhere
    const src = {
      name: 's',
      size,
      capabilities: caps,
      async extents(offset: number, length: number) {
        asked.push(offset);
        const out = [];
        for (let o = offset; o < offset + length; ) {
          const ws = o - (o % WR);
          if (o < ws + 4096) out.push({ offset: o, length: ws + 4096 - o, zero: false });
          else out.push({ offset: o, length: Math.min(ws + WR, size) - o, zero: true });
          o = out[out.length - 1].offset + out[out.length - 1].length;
          if (out.length > 1) break;
        }
        return out;
      },
      async read(_o: number, length: number) {
        return { data: Buffer.alloc(length, 1) };
      },
    } as unknown as Endpoint;
    const chunks: string[] = [];
    const source = new ExtentSource(src, { requestSize: 256 * 1024, skip: (ws) => ws === WR || ws === 2 * WR });
    for await (const c of source) {
      chunks.push(`${c.kind} ${c.offset}+${c.length}`);
      c.release?.();
    }
    expect(chunks).toEqual([`data 0+${256 * 1024}`, `zero ${256 * 1024}+${WR - 256 * 1024}`, `data ${3 * WR}+${256 * 1024}`, `zero ${3 * WR + 256 * 1024}+${WR - 256 * 1024}`, `data ${4 * WR}+5`]);
    // (the extent map may still ask ahead into a skipped range; the walk does not wait for it)
    expect(asked[0]).toBe(0);
  });

  it('Sink.written: every chunk starting below it has completed, in arrival order; Infinity at the end', async () => {
    const pending: Array<() => void> = [];
    const dst = {
      name: 't',
      size: 3 * WR,
      capabilities: { ...caps, wholeWrites: true },
      write: () => new Promise<void>((r) => pending.push(r)),
      zero: () => new Promise<void>((r) => pending.push(r)),
      flush: async () => undefined,
    } as unknown as Endpoint;
    const sink = new Sink(dst, { requestSize: 256 * 1024 });
    const data = Buffer.alloc(4096, 1);
    const settle = () => new Promise((r) => setImmediate(r));
    sink.write({ offset: 0, length: 4096, kind: 'data', data });
    sink.write({ offset: 4096, length: WR - 4096, kind: 'zero' });
    sink.write({ offset: 2 * WR, length: 4096, kind: 'data', data });
    await settle();
    expect(pending).toHaveLength(3);
    expect(sink.written).toBe(0);
    pending[1]();
    await settle();
    expect(sink.written).toBe(0); // the first write is still in flight
    pending[0]();
    await settle();
    expect(sink.written).toBe(WR);
    pending[2]();
    await settle();
    expect(sink.written).toBe(2 * WR + 4096);
    const finished = new Promise((r) => sink.on('finish', r));
    sink.end();
    await finished;
    expect(sink.written).toBe(Infinity);
  });
});
