/**
 * What the CLI tells a person about itself: --help laid out for the terminal's width, the width
 * of that terminal, and "unknown option" messages that name the nearest known option. Pure but
 * for terminalWidth(); yargs only parses (its own help cannot keep example commands whole).
 */

/** How an option's value shows in --help: `[size]` takes K/M/G suffixes, `[number]` is plain. */
export type ValueKind = 'boolean' | 'string' | 'size' | 'number';

/** One option as given to yargs' .options(), plus `value` for --help (default: its type). */
export interface OptionHelp {
  alias?: string | readonly string[];
  type: 'boolean' | 'string';
  describe: string;
  value?: ValueKind;
}

export interface HelpText {
  /** Synopsis lines, without "Usage: ". */
  usage: string[];
  /** Paragraphs (separated by blank lines), wrapped to the width. */
  description: string;
  /** [name, one-line description]. */
  commands?: ReadonlyArray<readonly [string, string]>;
  options: Readonly<Record<string, OptionHelp>>;
  /** [command, description]: the description, then the command on lines of its own. */
  examples?: ReadonlyArray<readonly [string, string]>;
}

/** Columns of the terminal `stream` writes to; else $COLUMNS; else 80. */
export function terminalWidth(stream: { isTTY?: boolean; columns?: number }, env: NodeJS.ProcessEnv = process.env): number {
  if (stream.isTTY && stream.columns) return stream.columns;
  const n = Number(env.COLUMNS);
  return Number.isInteger(n) && n > 0 ? n : 80;
}

/** The width --help is laid out for: the terminal's, kept between 40 and 100 columns. */
export function helpWidth(stream: { isTTY?: boolean; columns?: number } = process.stdout): number {
  return Math.max(40, Math.min(100, terminalWidth(stream)));
}

/**
 * Words of `text` in lines of at most `width` columns (a longer word keeps a line to itself).
 * The first line may have its own width. A no-break space (U+00A0) joins words that must stay on one line; it prints as a space.
 */
export function wrap(text: string, width: number, firstWidth = width): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(/[ \t\n]+/).filter(Boolean)) {
    if (line && line.length + 1 + word.length > (lines.length ? width : firstWidth)) {
      lines.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) lines.push(line);
  return lines.map((l) => l.replace(/\u00a0/g, ' '));
}

/** `text` wrapped to `width`, every line after `indent` spaces (the first after `first`, when given). */
function block(text: string, indent: number, width: number, first = ' '.repeat(indent)): string[] {
  return wrap(text, Math.max(10, width - indent), Math.max(10, width - first.length)).map((l, i) => (i === 0 ? first : ' '.repeat(indent)) + l);
}

/**
 * A shell command in lines of at most `width` columns: broken only between words (and not inside
 * a "[ CMD ARGS ]" group unless the group alone is too long), each broken line ending in " \" and
 * the rest indented further, so that it still reads (and pastes) as one command.
 */
export function commandLines(cmd: string, indent: number, width: number): string[] {
  const words: string[] = [];
  let depth = 0;
  for (const w of cmd.split(' ')) {
    // (a group grows while it fits a continued line: indent + 4, the group, " \\")
    if (depth > 0 && `${words[words.length - 1]} ${w}`.length <= width - indent - 6) words[words.length - 1] += ` ${w}`;
    else words.push(w);
    depth += w === '[' ? 1 : w === ']' && depth > 0 ? -1 : 0;
  }
  const lines: string[] = [];
  let line = ' '.repeat(indent) + words[0];
  for (let i = 1; i < words.length; i++) {
    const last = i === words.length - 1;
    if (line.length + 1 + words[i].length + (last ? 0 : 2) > width) {
      lines.push(`${line} \\`);
      line = ' '.repeat(indent + 4) + words[i];
    } else line += ` ${words[i]}`;
  }
  lines.push(line);
  return lines;
}

function aliases(o: OptionHelp): string[] {
  return o.alias === undefined ? [] : typeof o.alias === 'string' ? [o.alias] : [...o.alias];
}

/** "-C, --connections", "    --flush" (long-only options line up with the long names). */
function switches(name: string, o: OptionHelp, shortUsed: boolean): string {
  const all = [name, ...aliases(o)];
  const short = all.filter((n) => n.length === 1).map((n) => `-${n}`);
  const long = all.filter((n) => n.length > 1).map((n) => `--${n}`);
  const text = [...short, ...long].join(', ');
  return shortUsed && !short.length ? `    ${text}` : text;
}

/**
 * The --help text for `width` columns: no line is longer (but a single word longer than the
 * space it has), and example commands are whole lines or " \"-continued ones.
 */
export function formatHelp(h: HelpText, width: number): string {
  const out: string[] = [];
  h.usage.forEach((u, i) => out.push(...block(u, 7 + 4, width, i === 0 ? 'Usage: ' : '       ')));
  for (const para of h.description.split(/\n\s*\n/)) out.push('', ...wrap(para, width));

  if (h.commands?.length) {
    out.push('', 'Commands:');
    const left = Math.max(...h.commands.map(([n]) => n.length)) + 4;
    for (const [name, text] of h.commands) out.push(...block(text, left, width, `  ${name}`.padEnd(left)));
  }

  out.push('', 'Options:');
  const entries = Object.entries(h.options);
  const shortUsed = entries.some(([n, o]) => [n, ...aliases(o)].some((a) => a.length === 1));
  const flags = entries.map(([n, o]) => switches(n, o, shortUsed));
  // flags beside their description when that leaves the description room; else above it
  // (the column fits the flags up to 40% of the width; a longer one has a line to itself)
  const flagWidth = Math.max(...flags.map((f) => f.length).filter((n) => n <= Math.floor(width * 0.4)), 0);
  const left = 2 + flagWidth + 2;
  const beside = width - left >= 30;
  entries.forEach(([, o], i) => {
    const lines = !beside
      ? [...wrap(flags[i].trim(), width - 2).map((f) => `  ${f}`), ...block(o.describe, 6, width)]
      : flags[i].length <= flagWidth
        ? block(o.describe, left, width, `  ${flags[i]}`.padEnd(left))
        : [`  ${flags[i]}`, ...block(o.describe, left, width)];
    // the value's kind right-aligned on the flags (stacked) or the description's last line, when it fits
    const label = `[${o.value ?? o.type}]`;
    const at = beside ? lines.length - 1 : lines[0].length + 2 + label.length <= width ? 0 : lines.length - 1;
    if (lines[at].length + 2 + label.length <= width) lines[at] += beside ? label.padStart(width - lines[at].length) : `  ${label}`;
    else lines.push(label.padStart(width));
    out.push(...lines);
  });

  if (h.examples?.length) {
    out.push('', 'Examples:');
    for (const [cmd, text] of h.examples) out.push(...block(`${text}:`, 2, width), ...commandLines(cmd, 4, width));
  }
  return out.join('\n') + '\n';
}

/** --help among the options (not after "--"): the caller prints formatHelp() and exits 0. */
export function wantsHelp(args: readonly string[]): boolean {
  const end = args.indexOf('--');
  return (end < 0 ? args : args.slice(0, end)).includes('--help');
}

/** Edit distance with adjacent transpositions (optimal string alignment): "conections" → "connections" is 1. */
export function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}

/** The known long option nearest to `name` (both without "--"), if it is a likely typo of it. */
export function nearestOption(name: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const k of known) {
    if (k.length < 2) continue;
    const dist = editDistance(name, k);
    if (dist < bestDistance) [best, bestDistance] = [k, dist];
  }
  // one slip in a short name, two in a longer one
  return bestDistance <= (name.length > 5 ? 2 : 1) ? best : undefined;
}

/** Long names and aliases of `options`, plus yargs' own help and version. */
export function optionNames(options: Readonly<Record<string, OptionHelp>>, extra: readonly string[] = ['help']): string[] {
  return [...Object.entries(options).flatMap(([n, o]) => [n, ...aliases(o)]), ...extra];
}

/**
 * yargs' "Unknown arguments: conections, x" as the user spelled them, each with the nearest known
 * name: "unknown options: --conections (did you mean --connections?), -x". yargs also lists the
 * camel-case aliases it adds (frobNicate for --frob-nicate): those match no argument and are dropped.
 */
export function unknownOptions(list: string, args: readonly string[], known: readonly string[]): string {
  const end = args.indexOf('--');
  const opts = end < 0 ? args : args.slice(0, end);
  const spelled = new Set<string>();
  for (const n of list.split(', ')) {
    if (n.length === 1) spelled.add(`-${n}`);
    else if (opts.some((a) => a === `--${n}` || a.startsWith(`--${n}=`))) {
      const near = nearestOption(n, known);
      spelled.add(`--${n}${near ? ` (did you mean --${near}?)` : ''}`);
    }
  }
  if (!spelled.size) spelled.add(list);
  return `unknown option${spelled.size > 1 ? 's' : ''}: ${[...spelled].join(', ')}`;
}
