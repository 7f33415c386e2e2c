/** Counters shared by the stages of one copy. */
export interface CopyStats {
  bytesRead: number;
  bytesWritten: number;
  bytesZeroed: number;
  /** Zero ranges not sent because the target is known to be zero. */
  bytesSkipped: number;
  requests: { read: number; write: number; zero: number; extents: number };
  /** Extent queries that failed and whose ranges were copied as data. */
  extentErrors: number;
}

export function newStats(): CopyStats {
  return { bytesRead: 0, bytesWritten: 0, bytesZeroed: 0, bytesSkipped: 0, requests: { read: 0, write: 0, zero: 0, extents: 0 }, extentErrors: 0 };
}
