import { describe, expect, it } from 'vitest';
import { NbdStreamError } from '../../lib/errors.js';
import { splitEndpointArgs } from '../../lib/endpoints/command.js';

function usageError(args: string[]): NbdStreamError {
  try {
    splitEndpointArgs(args);
  } catch (e) {
    expect(e).toBeInstanceOf(NbdStreamError);
    expect((e as NbdStreamError).code).toBe('ERR_USAGE');
    return e as NbdStreamError;
  }
  throw new Error(`no error for ${JSON.stringify(args)}`);
}

describe('splitEndpointArgs', () => {
  it('turns each [ ... ] group into one argv array and keeps plain words', () => {
    expect(splitEndpointArgs(['[', 'nbdkit', 'memory', '1M', ']', 'out.img'])).toEqual([['nbdkit', 'memory', '1M'], 'out.img']);
    expect(splitEndpointArgs(['in.img', '[', 'qemu-nbd', '-f', 'raw', 'x.img', ']'])).toEqual(['in.img', ['qemu-nbd', '-f', 'raw', 'x.img']]);
    expect(splitEndpointArgs(['[', 'a', ']', '[', 'b', 'c', ']'])).toEqual([['a'], ['b', 'c']]);
    expect(splitEndpointArgs(['nbd://h/', '-'])).toEqual(['nbd://h/', '-']);
    expect(splitEndpointArgs([])).toEqual([]);
  });
  it('treats only the exact words [ and ] as brackets', () => {
    expect(splitEndpointArgs(['[x', 'y]', '[]'])).toEqual(['[x', 'y]', '[]']);
    expect(splitEndpointArgs(['[', 'sh', '-c', 'echo [a]', ']'])).toEqual([['sh', '-c', 'echo [a]']]);
  });
  it('does not nest: inside a group [ is an argument and the first ] closes it (as nbdcopy)', () => {
    expect(splitEndpointArgs(['[', 'test', '[', '-n', 'x', ']'])).toEqual([['test', '[', '-n', 'x']]);
    // so the ] meant for the inner [ closes the group, leaving a stray ]
    expect(usageError(['[', 'test', '[', 'x', ']', ']']).message).toMatch(/"\]" without a matching "\[" \(argument 6\)/);
  });
  it('rejects unbalanced and empty groups with ERR_USAGE', () => {
    expect(usageError(['[', 'nbdkit', 'memory', '1M']).message).toMatch(/"\[" at argument 1 has no matching "\]"/);
    expect(usageError(['out.img', '[']).message).toMatch(/argument 2 has no matching/);
    expect(usageError([']', 'x']).message).toMatch(/without a matching/);
    expect(usageError(['a', '[', ']', 'b']).message).toMatch(/empty "\[ \]" at argument 2/);
  });
  it('does not modify its input', () => {
    const args = ['[', 'nbdkit', 'null', ']', '-'];
    const copy = [...args];
    splitEndpointArgs(args);
    expect(args).toEqual(copy);
  });
});
