/**
 * --resume=STATEFILE: the state of a copy that may be interrupted (a crash, a kill, a lost
 * connection, a full disk) and run again. The file is append-only text, one record per line,
 * each `TEXT CHECK` where CHECK is the first 8 hex digits of sha256(TEXT):
 *
 *   nbdstream-resume 1 {"source":…,"sourceSize":…,"target":…,"targetSize":…} CHECK
 *   done OFFSET LENGTH CHECK          (a work range completely written and flushed to the target)
 *
 * A line that fails its check (a torn last record, garbage) is ignored: the range it named is
 * copied again. A work range is recorded only after every chunk of it has been written and the
 * target flushed since (a target that cannot flush, such as an NBD server without
 * NBD_FLAG_SEND_FLUSH, is taken to write through); records are fsync'd at most every few seconds.
 * The header names the source and target so a rerun against anything else is refused.
 */
import * as fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import * as path from 'node:path';
import { nodeCrypto, nodeFsPromises } from './builtins.js';
import { NbdStreamError } from './errors.js';
import { WORK_RANGE } from './extents.js';
import type { Endpoint } from './endpoints/endpoint.js';

export const RESUME_MAGIC = 'nbdstream-resume 1';
/** Default milliseconds between records (each costs a target flush and an fsync). */
export const RESUME_INTERVAL_MS = 2000;

/** What the state file says the copy is. */
export interface ResumeHeader {
  source: string;
  sourceSize: number;
  /** Regular file or block device under the source (Endpoint.identity). */
  sourceId?: string;
  /** A regular-file source: its mtime in nanoseconds (a decimal string). */
  sourceMtime?: string;
  target: string;
  targetSize: number;
  targetId?: string;
}

export interface ResumeFile {
  header: ResumeHeader | undefined;
  /** Ranges recorded as done (in file order, may overlap): whole work ranges, or up to the end. */
  done: Array<{ offset: number; length: number }>;
  /** Lines that failed their check or were not understood (ignored). */
  bad: number;
}

function check(text: string): string {
  return nodeCrypto().createHash('sha256').update(text).digest('hex').slice(0, 8);
}

/** One self-checking line (with its newline). */
export function encodeRecord(text: string): string {
  return `${text} ${check(text)}\n`;
}

export function encodeHeader(h: ResumeHeader): string {
  return encodeRecord(`${RESUME_MAGIC} ${JSON.stringify(h)}`);
}

export function encodeDone(offset: number, length: number): string {
  return encodeRecord(`done ${offset} ${length}`);
}

/** The TEXT of a line whose check matches, else undefined. A line without its newline is torn. */
function verified(line: string): string | undefined {
  const sp = line.lastIndexOf(' ');
  if (sp < 0) return undefined;
  const text = line.slice(0, sp);
  return line.slice(sp + 1) === check(text) ? text : undefined;
}

/**
 * Decode a state file's contents. The header must be the first line: a file that does not start
 * with RESUME_MAGIC is not a state file (ERR_USAGE, so a mistyped path is never overwritten); one
 * whose header is torn holds nothing. Bad `done` lines are counted and skipped.
 */
export function decodeState(content: string, name = 'state file'): ResumeFile {
  if (content.length > 0 && !content.startsWith(RESUME_MAGIC.slice(0, Math.min(content.length, RESUME_MAGIC.length))))
    throw new NbdStreamError('ERR_USAGE', '--resume: not an nbdstream state file (refusing to overwrite it)', { endpoint: name });
  const lines = content.split('\n');
  // the part after the last newline is a torn record (or empty)
  const torn = lines.pop() !== '' ? 1 : 0;
  const out: ResumeFile = { header: undefined, done: [], bad: torn };
  const first = lines.length ? verified(lines[0]) : undefined;
  if (first === undefined) return { header: undefined, done: [], bad: out.bad + lines.length };
  try {
    out.header = JSON.parse(first.slice(RESUME_MAGIC.length + 1)) as ResumeHeader;
  } catch {
    return { header: undefined, done: [], bad: out.bad + lines.length };
  }
  for (const line of lines.slice(1)) {
    const m = /^done (\d+) (\d+)$/.exec(verified(line) ?? '');
    const offset = m ? Number(m[1]) : -1;
    const length = m ? Number(m[2]) : -1;
    if (!m || !Number.isSafeInteger(offset + length) || offset % WORK_RANGE !== 0 || length <= 0) out.bad++;
    else out.done.push({ offset, length });
  }
  return out;
}

/** The header for a source and target (files: identity, and the source's mtime). */
export function describeCopy(src: Endpoint, dst: Endpoint): ResumeHeader {
  const h: ResumeHeader = { source: src.name, sourceSize: src.size!, target: dst.name, targetSize: dst.size! };
  if (src.identity !== undefined) {
    h.sourceId = src.identity;
    const mtime = fileMtime(src.name, src.identity);
    if (mtime !== undefined) h.sourceMtime = mtime;
  }
  if (dst.identity !== undefined) h.targetId = dst.identity;
  return h;
}

/** mtime (ns) of the regular file at `name` when it is the file with `identity`. */
function fileMtime(name: string, identity: string): string | undefined {
  try {
    const st = fs.statSync(name, { bigint: true });
    return st.isFile() && `file ${st.dev}:${st.ino}` === identity ? st.mtimeNs.toString() : undefined;
  } catch {
    return undefined;
  }
}

const FIELDS: Array<[keyof ResumeHeader, string]> = [
  ['source', "source's name"],
  ['sourceSize', "source's size"],
  ['sourceId', 'source file (device:inode)'],
  ['sourceMtime', "source's mtime (ns)"],
  ['target', "destination's name"],
  ['targetSize', "destination's size"],
  ['targetId', 'destination file (device:inode)'],
];

/** Refuse a resume against another copy: the first field that differs, in one line. */
export function checkSame(was: ResumeHeader, now: ResumeHeader, only: 'source' | 'target', name: string): void {
  for (const [k, what] of FIELDS) {
    if (!k.startsWith(only) || was[k] === now[k]) continue;
    const show = (v: unknown) => (v === undefined ? 'none' : String(v));
    throw new NbdStreamError('ERR_USAGE', `--resume: not resuming: the ${what} is ${show(now[k])}, the state file says ${show(was[k])} (delete the state file to copy everything again)`, { endpoint: name });
  }
}

/** Replace `file` with `data` durably (temporary file, fsync, rename, fsync of the directory). */
async function replaceFile(file: string, data: string): Promise<void> {
  const tmp = `${file}.tmp`;
  const fh = await nodeFsPromises().open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await nodeFsPromises().rename(tmp, file);
  await syncDir(path.dirname(file));
}

async function syncDir(dir: string): Promise<void> {
  const fh = await nodeFsPromises().open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

function ioError(what: string, err: unknown, name: string): NbdStreamError {
  const e = err as NodeJS.ErrnoException;
  return new NbdStreamError('ERR_IO', `--resume: cannot ${what} the state file: ${e.code ?? e.message}`, { endpoint: name, cause: err });
}

/**
 * One copy's state file. open() reads it (if any) and checks the source; begin() checks the
 * target (or, on a fresh start, writes the header); add() appends work ranges; remove() at the end.
 */
export class ResumeState {
  /** Work range starts recorded as done (by an earlier run, and by this one as it goes). */
  readonly done = new Set<number>();
  private header: ResumeHeader | undefined;
  private fh: FileHandle | undefined;

  private constructor(
    readonly file: string,
    readonly size: number,
    previous: ResumeFile,
  ) {
    this.header = previous.header;
    // a range counts for the work ranges it covers whole (the last one may end at the end)
    if (previous.header)
      for (const r of previous.done)
        for (let o = r.offset; o < size && Math.min(o + WORK_RANGE, size) <= r.offset + r.length; o += WORK_RANGE) this.done.add(o);
  }

  /** Read `file` (missing or torn: a fresh start) and refuse it when it is for another source. */
  static async open(file: string, src: Endpoint): Promise<ResumeState> {
    if (src.size === undefined || !src.capabilities.seekable || src.chunks)
      throw new NbdStreamError('ERR_USAGE', '--resume needs a source of known size that can be read at any offset', { endpoint: src.name });
    let content = '';
    try {
      // a glance at the head first: a mistyped path to an image is not read whole
      const fh = await nodeFsPromises().open(file, 'r');
      try {
        const head = Buffer.alloc(RESUME_MAGIC.length);
        const { bytesRead } = await fh.read(head, 0, head.length, 0);
        content = head.subarray(0, bytesRead).toString('latin1');
      } finally {
        await fh.close();
      }
      if (content.startsWith(RESUME_MAGIC)) content = await nodeFsPromises().readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw ioError('read', err, file);
    }
    const state = new ResumeState(file, src.size, decodeState(content, file));
    if (state.header) checkSame(state.header, describeCopy(src, { name: '', size: 0 } as Endpoint), 'source', file);
    return state;
  }

  /** True when an earlier run's state was found: the target must be opened as it is (no truncation). */
  get resuming(): boolean {
    return this.header !== undefined;
  }

  /** Bytes of the source an earlier run completed (skipped now). */
  get resumedBytes(): number {
    let n = 0;
    for (const o of this.done) n += Math.min(WORK_RANGE, this.size - o);
    return n;
  }

  /**
   * With the target open: refuse another target, then rewrite the file with only its good
   * records (a torn tail would swallow the next append) and open it for appending.
   */
  async begin(src: Endpoint, dst: Endpoint): Promise<void> {
    if (!dst.capabilities.seekable) throw new NbdStreamError('ERR_USAGE', '--resume needs a destination that can be written at any offset', { endpoint: dst.name });
    const now = describeCopy(src, dst);
    if (this.header) checkSame(this.header, now, 'target', this.file);
    else this.header = now;
    const records = encodeHeader(this.header) + this.encodeRanges([...this.done].sort((a, b) => a - b));
    try {
      await replaceFile(this.file, records);
      this.fh = await nodeFsPromises().open(this.file, 'a');
    } catch (err) {
      throw ioError('write', err, this.file);
    }
  }

  /** Append work ranges (already flushed to the target) and fsync. */
  async add(starts: number[]): Promise<void> {
    const fresh = starts.filter((o) => !this.done.has(o));
    if (!fresh.length || !this.fh) return;
    try {
      await this.fh.write(this.encodeRanges(fresh));
      await this.fh.datasync();
    } catch (err) {
      throw ioError('write', err, this.file);
    }
    for (const o of fresh) this.done.add(o);
  }

  /** `done` records for ascending work range starts, consecutive ones merged. */
  private encodeRanges(starts: number[]): string {
    let out = '';
    for (let i = 0; i < starts.length; ) {
      let j = i + 1;
      while (j < starts.length && starts[j] === starts[j - 1] + WORK_RANGE) j++;
      out += encodeDone(starts[i], Math.min(starts[j - 1] + WORK_RANGE, this.size) - starts[i]);
      i = j;
    }
    return out;
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close();
  }

  /** The copy is complete: the state file goes. */
  async remove(): Promise<void> {
    await this.close();
    await nodeFsPromises().rm(this.file, { force: true });
  }
}

/**
 * Records the work ranges a Sink has completely written: every `intervalMs` (and at stop), the
 * target is flushed and the ranges below the sink's watermark taken before the flush are appended.
 */
export class ResumeRecorder {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  /** Every work range below this is recorded. */
  private from = 0;

  constructor(
    private readonly state: ResumeState,
    private readonly dst: Endpoint,
    /** Every chunk that starts below this offset has been written (Sink.written). */
    private readonly written: () => number,
    intervalMs = RESUME_INTERVAL_MS,
  ) {
    this.timer = setInterval(() => void this.tick().catch(() => undefined), intervalMs);
    this.timer.unref();
  }

  /** Work ranges wholly below `upTo` not yet recorded. */
  private pending(upTo: number): number[] {
    const out: number[] = [];
    for (let o = this.from; o < this.state.size && Math.min(o + WORK_RANGE, this.state.size) <= upTo; o += WORK_RANGE) if (!this.state.done.has(o)) out.push(o);
    return out;
  }

  /** Flush and record what is written now (waits for a record in progress first). */
  tick(): Promise<void> {
    const run = async (): Promise<void> => {
      const upTo = this.written();
      const ranges = this.pending(upTo);
      if (ranges.length) {
        await this.dst.flush();
        await this.state.add(ranges);
      }
      this.from = Math.max(this.from, Math.min(upTo, this.state.size) - (Math.min(upTo, this.state.size) % WORK_RANGE));
    };
    const p = (this.running ?? Promise.resolve()).catch(() => undefined).then(run);
    this.running = p;
    return p;
  }

  /** Stop the timer; with `final`, record once more (errors are the caller's). */
  async stop(final: boolean): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    if (final) await this.tick();
    else await this.running?.catch(() => undefined);
  }
}
