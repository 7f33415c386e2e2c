/**
 * copyProgress(src, dst, options): copy() as an async iterator of progress reports.
 *
 *   const it = copyProgress(src, dst, { verify: true });
 *   for await (const p of it) console.log(p.phase, p.bytes_done, p.bytes_total);
 *
 * Yields a CopyProgress at most every `interval` ms (default 250) and always the last one
 * (phase "done"); the generator's return value is the CopySummary, and a failed copy throws
 * from the loop. Leaving the loop early (break, return, a throw) cancels the copy as its
 * `signal` would, and the loop is left once the copy has stopped and closed its endpoints.
 */
import { COPY_OPTIONS, copy, type CopyOptions, type CopySummary } from './copy.js';
import { checkOptionNames } from './errors.js';
import type { Endpoint } from './endpoints/endpoint.js';
import type { EndpointSpec } from './endpoints/open.js';
import { throttle, type CopyProgress } from './progress.js';

export interface CopyProgressOptions extends CopyOptions {
  /** Least time between two reports, in ms (default 250). */
  interval?: number;
}

const COPY_PROGRESS_OPTIONS: Readonly<Record<keyof CopyProgressOptions, true>> = { ...COPY_OPTIONS, interval: true };

export async function* copyProgress(
  src: EndpointSpec | Endpoint,
  dst: EndpointSpec | Endpoint,
  options: CopyProgressOptions = {},
): AsyncGenerator<CopyProgress, CopySummary, undefined> {
  checkOptionNames('copyProgress()', options, COPY_PROGRESS_OPTIONS);
  const { interval, signal, ...copyOptions } = options;
  // the copy's signal: the caller's, or leaving the loop
  const cancel = new AbortController();
  const onAbort = () => cancel.abort(signal?.reason);
  if (signal?.aborted) onAbort();
  else signal?.addEventListener('abort', onAbort, { once: true });
  const queue: CopyProgress[] = [];
  let wake: (() => void) | undefined;
  const notify = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const t = throttle<CopyProgress>((p) => {
    queue.push(p);
    notify();
  }, interval ?? 250);
  let settled: { ok: true; summary: CopySummary } | { ok: false; error: unknown } | undefined;
  const user = options.onProgress;
  const copying = copy(src, dst, {
    ...copyOptions,
    signal: cancel.signal,
    onProgress: (done, total, p) => {
      user?.(done, total, p);
      if (p.phase === 'done') t.final(p);
      else t.push(p);
    },
  }).then(
    (summary) => {
      settled = { ok: true, summary };
      notify();
    },
    (error: unknown) => {
      t.cancel();
      settled = { ok: false, error };
      notify();
    },
  );
  try {
    for (;;) {
      while (queue.length) yield queue.shift()!;
      if (settled) break;
      await new Promise<void>((r) => (wake = r));
    }
    while (queue.length) yield queue.shift()!;
  } finally {
    signal?.removeEventListener('abort', onAbort);
    if (!settled) {
      // the loop was left early: stop the copy and wait until it has let go of its endpoints
      t.cancel();
      cancel.abort(new Error('copyProgress: the loop was left'));
      await copying;
    }
  }
  if (!settled.ok) throw settled.error;
  return settled.summary;
}
