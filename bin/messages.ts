/**
 * Library errors name options as the library does (`requestSize must be …`, NbdStreamError's
 * `option`); the command line says `--request-size must be …`. One line per error.
 */
import { NbdStreamError } from '../lib/errors.js';

/** Library option names whose flag is not their kebab-case. */
const FLAGS: Record<string, string> = { sourcePipeFormat: '--pipe-format' };

/** The CLI flag for a library option name: requestSize → --request-size. */
export function flagOf(option: string): string {
  return FLAGS[option] ?? `--${option.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
}

/** An error as the CLI prints it: "endpoint: offset N: message", options named by their flags. */
export function cliMessage(err: unknown): string {
  if (!(err instanceof NbdStreamError)) return (err as Error | undefined)?.message ?? String(err);
  if (err.option === undefined) return err.describe();
  const message = err.message.replace(new RegExp(`\\b${err.option}\\b`), flagOf(err.option));
  return new NbdStreamError(err.code, message, err).describe();
}
