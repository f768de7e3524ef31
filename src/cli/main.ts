#!/usr/bin/env node
// The `ubcache` command: dispatches to one file per subcommand.

import { CliError, packageVersion, type Subcommand } from './common.ts';
import { errorMessage } from '../util/lifecycle.ts';

interface Entry {
  summary: string;
  load: () => Promise<Subcommand>;
}

const subcommands: Record<string, Entry> = {
  export: {
    summary: 'serve files or block devices over NBD',
    load: async () => (await import('./export.ts')).run,
  },
  make: {
    summary: 'format cache and backing devices (make-bcache)',
    load: async () => (await import('./make.ts')).run,
  },
  serve: {
    summary: 'register bcache devices and serve them over NBD',
    load: async () => (await import('./serve.ts')).run,
  },
  ctl: {
    summary: "read and write a running serve's bcache sysfs attributes",
    load: async () => (await import('./ctl.ts')).run,
  },
  'show-super': {
    summary: "print a device's bcache superblock (bcache-super-show)",
    load: async () => (await import('./show-super.ts')).run,
  },
};

function usage(): string {
  const lines = [
    'Usage: ubcache <command> [options]',
    '',
    'Linux bcache as a userspace daemon, served over NBD.',
    '',
    'Commands:',
    ...Object.entries(subcommands).map(([name, e]) => `  ${name.padEnd(12)} ${e.summary}`),
    '',
    'Run `ubcache <command> --help` for the options of a command.',
    'Options: --help, --version',
  ];
  return lines.join('\n') + '\n';
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === undefined || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(usage());
    return cmd === undefined ? 1 : 0;
  }
  if (cmd === '--version' || cmd === '-V' || cmd === 'version') {
    process.stdout.write(`ubcache ${packageVersion()}\n`);
    return 0;
  }
  const entry = subcommands[cmd];
  if (!entry) {
    process.stderr.write(`ubcache: unknown command '${cmd}'\n`);
    process.stderr.write(`Run 'ubcache --help' for the list of commands.\n`);
    return 1;
  }
  try {
    const run = await entry.load();
    return await run(rest);
  } catch (err) {
    if (err instanceof CliError) {
      process.stderr.write(`ubcache ${cmd}: ${err.message}\n`);
      if (err.hint) process.stderr.write(`${err.hint}\n`);
      return err.status;
    }
    process.stderr.write(`ubcache ${cmd}: ${errorMessage(err)}\n`);
    return 1;
  }
}

main(process.argv.slice(2)).then(
  (status) => {
    process.exitCode = status;
  },
  (err: unknown) => {
    process.stderr.write(`ubcache: ${errorMessage(err)}\n`);
    process.exitCode = 1;
  },
);
