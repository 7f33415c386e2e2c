/** Run the built CLI (bin/nbdstream) as a user would. */
import { spawn } from 'node:child_process';
import { expect } from 'vitest';
import * as path from 'node:path';

export const ROOT = path.resolve(__dirname, '../..');
export const CLI = path.join(ROOT, 'bin/nbdstream');

export interface CliResult {
  status: number | null;
  stdout: Buffer;
  stderr: string;
}

/** Run `nbdstream ARGS` (or a shell pipeline with $NBDSTREAM when `shell` is set). */
export function run(args: string[], o: { shell?: string; input?: Buffer; env?: Record<string, string>; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const p = o.shell
      ? spawn('sh', ['-c', o.shell], { env: { ...process.env, NBDSTREAM: CLI, ...o.env }, stdio: ['pipe', 'pipe', 'pipe'] })
      : spawn(CLI, args, { env: { ...process.env, ...o.env }, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    p.stdout.on('data', (d) => out.push(d));
    p.stderr.on('data', (d) => (err += d));
    const timer = setTimeout(() => {
      p.kill('SIGKILL');
      reject(new Error(`nbdstream ${args.join(' ')} timed out; stderr: ${err}`));
    }, o.timeoutMs ?? 60000);
    p.on('error', reject);
    p.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout: Buffer.concat(out), stderr: err });
    });
    if (o.input) p.stdin.end(o.input);
    else p.stdin.end();
  });
}

/** A success: exit status 0 and nothing on stderr. Returns stdout. */
export function ok(r: CliResult): string {
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  return r.stdout.toString();
}
