/**
 * copyProgress(src, dst, options): copy() as an async iterator of progress reports.
 *
 *   const it = copyProgress(src, dst, { verify: true });
 *   for await (const p of it) console.log(p.phase, p.bytes_done, p.bytes_total);
 *
 * Yields a CopyProgress at most every `interval` ms (default 250) and always the last one
 * (phase "done"); the generator's return value is the CopySummary, and a failed copy throws
 * from the loop. Leaving the loop early does not stop the copy: it runs on, unobserved.
 */
import { copy, type CopyOptions, type CopySummary } from './copy.js';
import type { Endpoint } from './endpoints/endpoint.js';
import type { EndpointSpec } from './endpoints/open.js';
import { throttle, type CopyProgress } from './progress.js';

export interface CopyProgressOptions extends CopyOptions {
  /** Least time between two reports, in ms (default 250). */
  interval?: number;
}

export async function* copyProgress(
  src: EndpointSpec | Endpoint,
  dst: EndpointSpec | Endpoint,
  options: CopyProgressOptions = {},
): AsyncGenerator<CopyProgress, CopySummary, undefined> {
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
  }, options.interval ?? 250);
  let settled: { ok: true; summary: CopySummary } | { ok: false; error: unknown } | undefined;
  const user = options.onProgress;
  copy(src, dst, {
    ...options,
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
  for (;;) {
    while (queue.length) yield queue.shift()!;
    if (settled) break;
    await new Promise<void>((r) => (wake = r));
  }
  while (queue.length) yield queue.shift()!;
  if (!settled.ok) throw settled.error;
  return settled.summary;
}
