/**
 * Progress of a copy as one plain object (the shape of a `--progress=json` line), a throttle
 * for emitting it at most every N ms, and the human progress bar.
 */
import type { CopyStats } from './streams/stats.js';

export type CopyPhase = 'copying' | 'verifying' | 'done';

/** One progress report; `--progress=json` prints exactly this object, one per line. */
export interface CopyProgress {
  /** Bytes of the source covered (read and written, zeroed or skipped); monotonic. */
  bytes_done: number;
  /** Source size (null for a source of unknown size until it ends). */
  bytes_total: number | null;
  bytes_read: number;
  bytes_written: number;
  bytes_zeroed: number;
  /** Bytes per second in the current phase (average since the phase began). */
  rate: number;
  /** Seconds left in the current phase at that rate (null when unknown). */
  eta_s: number | null;
  phase: CopyPhase;
  /** With --verify: bytes of the target re-read and hashed so far. */
  bytes_verified?: number;
}

/**
 * Builds CopyProgress objects from a copy's counters. copied()/verified() are called as work
 * completes; every call produces a report for `emit`.
 */
export class ProgressTracker {
  private phase: CopyPhase = 'copying';
  private phaseStart = process.hrtime.bigint();
  private readonly start = this.phaseStart;
  private done = 0;
  private verifiedBytes = 0;
  private total: number | undefined;

  constructor(
    private readonly stats: CopyStats,
    total: number | undefined,
    private readonly verify: boolean,
    private readonly emit: (p: CopyProgress) => void,
  ) {
    this.total = total;
  }

  /** Bytes of the source covered so far. */
  copied(done: number): void {
    if (done > this.done) this.done = done;
    this.emit(this.report());
  }

  /** The copy is complete: from now on progress is the re-read of the target. */
  startVerify(size: number): void {
    this.total ??= size;
    this.done = Math.max(this.done, size);
    this.phase = 'verifying';
    this.phaseStart = process.hrtime.bigint();
    this.emit(this.report());
  }

  verified(bytes: number): void {
    if (bytes > this.verifiedBytes) this.verifiedBytes = bytes;
    this.emit(this.report());
  }

  /** Everything succeeded: the last report (bytes_done == bytes_total). */
  finish(size: number): CopyProgress {
    this.total = size;
    this.done = size;
    if (this.verify) this.verifiedBytes = size;
    this.phase = 'done';
    const p = this.report();
    this.emit(p);
    return p;
  }

  report(): CopyProgress {
    const now = process.hrtime.bigint();
    const total = this.total;
    let rate: number;
    let left: number | undefined;
    if (this.phase === 'done') {
      const s = Number(now - this.start) / 1e9;
      rate = s > 0 ? this.done / s : 0;
      left = 0;
    } else {
      const s = Number(now - this.phaseStart) / 1e9;
      const n = this.phase === 'verifying' ? this.verifiedBytes : this.done;
      rate = s >= 0.001 ? n / s : 0;
      left = total === undefined ? undefined : total - n;
    }
    const eta = left === undefined ? null : left === 0 ? 0 : rate > 0 ? Math.round((left / rate) * 10) / 10 : null;
    const p: CopyProgress = {
      bytes_done: this.done,
      bytes_total: total ?? null,
      bytes_read: this.stats.bytesRead,
      bytes_written: this.stats.bytesWritten,
      bytes_zeroed: this.stats.bytesZeroed,
      rate: Math.round(rate),
      eta_s: eta,
      phase: this.phase,
    };
    if (this.verify) p.bytes_verified = this.verifiedBytes;
    return p;
  }
}

/**
 * Percent of the whole job (copy, then the re-read when verifying) for `N/100` lines and the
 * bar: 100 only once everything is done.
 */
export function progressPercent(p: CopyProgress): number {
  if (p.phase === 'done') return 100;
  if (!p.bytes_total) return 0;
  const verify = p.bytes_verified !== undefined;
  const work = p.bytes_done + (p.bytes_verified ?? 0);
  return Math.min(99, Math.floor((work * 100) / (p.bytes_total * (verify ? 2 : 1))));
}

/**
 * Pass values to `fn` at most once every `ms` milliseconds: the first at once, later ones when
 * the interval has passed (the newest value; a pending one is sent by a timer). final() sends
 * its value at once and stops.
 */
export function throttle<T>(fn: (v: T) => void, ms = 250): { push(v: T): void; final(v: T): void; cancel(): void } {
  let last = -Infinity;
  let pending: T | undefined;
  let has = false;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const send = () => {
    timer = undefined;
    if (!has) return;
    has = false;
    last = Date.now();
    const v = pending as T;
    pending = undefined;
    fn(v);
  };
  return {
    push(v: T) {
      if (stopped) return;
      pending = v;
      has = true;
      const wait = last + ms - Date.now();
      if (wait <= 0) send();
      else if (!timer) {
        timer = setTimeout(send, wait);
        timer.unref?.();
      }
    },
    final(v: T) {
      if (stopped) return;
      stopped = true;
      if (timer) clearTimeout(timer);
      has = false;
      fn(v);
    },
    cancel() {
      stopped = true;
      if (timer) clearTimeout(timer);
    },
  };
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** 1536 -> "1.5 KiB". */
export function formatBytes(n: number): string {
  let i = 0;
  while (n >= 1024 && i < UNITS.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i === 0 ? n.toFixed(0) : n.toFixed(1)} ${UNITS[i]}`;
}

/** Seconds -> "0:07", "12:34", "1:02:03"; "--:--" when unknown. */
export function formatEta(s: number | null): string {
  if (s === null || !Number.isFinite(s)) return '--:--';
  const t = Math.ceil(s);
  const h = Math.floor(t / 3600);
  const m = Math.floor((t % 3600) / 60);
  const sec = String(t % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** The bar's own width: at most this many columns of # and ., at least the minimum when it can. */
const BAR_MAX = 40;
const BAR_MIN = 10;

/**
 * The human bar in at most `width` columns: "[#######.......]  42%" and, when `detail` (a
 * terminal), the rate and ETA: "[#######.......]  42%  310.2 MiB/s  ETA 0:12" ("verify" while
 * re-reading the target). The bar shrinks to fit, down to 10 columns; below that the rate is
 * left out, then "verify", then the ETA. The rate and ETA are padded so the bar keeps its size
 * from one redraw to the next.
 */
export function formatBar(percent: number, p: CopyProgress | undefined, detail: boolean, width = 80): string {
  const pct = ` ${String(percent).padStart(3)}%`;
  // [text, order in which it is left out]
  const fields: Array<[string, number]> = [];
  if (detail && p) {
    fields.push([`${formatBytes(p.rate)}/s`.padStart(12), 1]);
    fields.push([(p.phase === 'done' ? 'done' : `ETA ${formatEta(p.eta_s)}`).padEnd(9), 3]);
    if (p.phase === 'verifying') fields.push(['verify', 2]);
  }
  const room = () => width - 2 - pct.length - fields.reduce((n, [f]) => n + 2 + f.length, 0);
  while (room() < BAR_MIN && fields.length) fields.splice(fields.indexOf(fields.reduce((a, b) => (b[1] < a[1] ? b : a))), 1);
  const bar = Math.max(BAR_MIN, Math.min(BAR_MAX, room()));
  const filled = Math.round((percent / 100) * bar);
  return `[${'#'.repeat(filled)}${'.'.repeat(bar - filled)}]${pct}${fields.map(([f]) => `  ${f}`).join('')}`.trimEnd();
}
