// Shared pieces of the subcommands: errors that carry an exit status and a
// hint, and the version string.

import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, type ParseArgsConfig } from 'node:util';

/**
 * An error the user can act on. main() prints `ubcache <cmd>: <message>` and,
 * when given, the hint on the next line, then exits with `status`.
 */
export class CliError extends Error {
  readonly status: number;
  readonly hint: string | undefined;
  constructor(message: string, options: { status?: number; hint?: string } = {}) {
    super(message);
    this.name = 'CliError';
    this.status = options.status ?? 1;
    this.hint = options.hint;
  }
}

/**
 * A subcommand's options and operands (strict, operands allowed); anything
 * parseArgs refuses becomes a CliError carrying the command's usage hint.
 */
export function parseCommandArgs<const O extends NonNullable<ParseArgsConfig['options']>>(
  args: string[],
  options: O,
  hint: string,
) {
  try {
    return parseArgs({ args, options, allowPositionals: true as const, strict: true as const });
  } catch (err) {
    throw new CliError(err instanceof Error ? err.message : String(err), { hint });
  }
}

/** A subcommand: takes its own arguments (after the subcommand name), returns the exit status. */
export type Subcommand = (args: string[]) => Promise<number>;

export function packageVersion(): string {
  // src/cli/common.ts and dist/cli/common.js are both two levels below the package root.
  const here = dirname(fileURLToPath(import.meta.url));
  const pkg = JSON.parse(readFileSync(join(here, '..', '..', 'package.json'), 'utf8')) as { version?: unknown };
  return typeof pkg.version === 'string' ? pkg.version : 'unknown';
}
