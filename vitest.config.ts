import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    // The JSON report is what .ci/run counts (passed / failed / skipped).
    reporters: ['default', 'json'],
    outputFile: { json: 'test-results.json' },
  },
});
