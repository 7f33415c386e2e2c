/**
 * ReplyBudget: one memory budget shared by all clients of an NbdServer. It counts the bytes a
 * server holds for its clients: a read's reply from the moment the request is taken (the data
 * will be read into memory), a write's payload until the write is done, and every reply byte
 * handed to a socket until the socket has taken it. A client that sends reads and never reads
 * the replies holds them here.
 *
 * Contract (applied by the server's connections): while the budget is exceeded, no client that
 * holds any of it is read from; a client holding nothing may still send requests, so a few
 * clients that never read cannot starve the others (the overshoot is at most one request per
 * client). `onChange` runs when the budget becomes exceeded or stops being exceeded.
 */
export class ReplyBudget {
  /** Bytes held now. */
  used = 0;

  constructor(
    /** Bytes held before the budget counts as exceeded. */
    readonly limit: number,
    private readonly onChange: () => void,
  ) {}

  get exceeded(): boolean {
    return this.used >= this.limit;
  }

  take(n: number): void {
    if (n <= 0) return;
    const was = this.exceeded;
    this.used += n;
    if (!was && this.exceeded) this.onChange();
  }

  give(n: number): void {
    if (n <= 0) return;
    const was = this.exceeded;
    this.used -= n;
    if (was && !this.exceeded) this.onChange();
  }
}
