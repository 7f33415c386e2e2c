import * as fs from 'node:fs';

/**
 * Write `text` to `fd` with plain write(2)s, whole. process.stdout and process.stderr are left
 * alone: on a pipe Node would load node:net to make them, and set O_NONBLOCK on a descriptor the
 * process may share with other writers. A descriptor someone else made non-blocking is retried.
 */
export function writeAll(fd: number, text: string): void {
  const b = Buffer.from(text);
  for (let pos = 0; pos < b.length; ) {
    try {
      pos += fs.writeSync(fd, b, pos);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') return;
    }
  }
}
