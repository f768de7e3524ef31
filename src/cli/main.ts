#!/usr/bin/env node
// The `ubcache` command: dispatches to one file per subcommand.

import { CliError, packageVersion, type Subcommand } from './common.ts';
import { errorMessage } from '../util/lifecycle.ts';
import { journalPrefix } from '../util/log.ts';

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
  flush: {
    summary: "write a cache's dirty data back to its backing devices, offline",
    load: async () => (await import('./flush.ts')).run,
  },
  'show-super': {
    summary: "print a device's bcache superblock (bcache-super-show)",
    load: async () => (await import('./show-super.ts')).run,
  },
};

/**
 * serve and export do their file I/O through the I/O engine; when that is
 * libuv's thread pool, its default of 4 threads caps a slow device at 4 I/Os
 * in flight, so they get this many unless the user chose (UV_THREADPOOL_SIZE).
 */
const SERVER_POOL_SIZE = 32;
/** Set across the re-execution below, so the new image knows it was sized by us and does not do it again. */
const POOL_SIZED_MARK = 'UBCACHE_POOL_SIZED';

/**
 * Choose the I/O engine before serve or export runs (a forced engine that
 * is unavailable fails here, before anything is opened), size the thread
 * pool if it is the engine, and log the choice. libuv reads
 * UV_THREADPOOL_SIZE once, when its pool first runs, and Node 20's ES module
 * loader has run it (reading this very file) before any of our code: setting
 * the variable now would change nothing. So the process re-executes itself
 * (execve: same pid, stdio and signals, nothing for a supervisor or a kill
 * -9 to notice) with the variable set, once.
 */
async function prepareIoEngine(cmd: string, rest: string[]): Promise<void> {
  if ((cmd !== 'serve' && cmd !== 'export') || rest.includes('--help') || rest.includes('-h')) return;
  const engines = await import('../blockdev/io-engine.ts');
  const status = engines.ioEngineStatus();
  const sized = process.env[POOL_SIZED_MARK];
  if (sized !== undefined) {
    Reflect.deleteProperty(process.env, POOL_SIZED_MARK);
    engines.setThreadPoolNote(`${sized} threads (UV_THREADPOOL_SIZE was unset, so ubcache ${cmd} set it)`);
  } else if (status.name === 'threadpool' && process.env['UV_THREADPOOL_SIZE'] === undefined) {
    const { loadNative } = await import('../blockdev/native.ts');
    const execve = loadNative()?.execve;
    const script = process.argv[1];
    let why = 'the native addon is not loaded';
    if (execve != null && script !== undefined) {
      const env = {
        ...process.env,
        UV_THREADPOOL_SIZE: String(SERVER_POOL_SIZE),
        [POOL_SIZED_MARK]: String(SERVER_POOL_SIZE),
      };
      const envp = Object.entries(env).map(([k, v]) => `${k}=${v}`);
      try {
        execve(process.execPath, [process.execPath, ...process.execArgv, script, cmd, ...rest], envp);
      } catch (err) {
        why = `re-executing failed: ${errorMessage(err)}`;
      }
    }
    engines.setThreadPoolNote(
      `${engines.threadPoolSize()} threads (${why}; set UV_THREADPOOL_SIZE=${SERVER_POOL_SIZE} for more I/O in flight)`,
    );
  }
  engines.ioEngine();
}

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
    await prepareIoEngine(cmd, rest);
    const run = await entry.load();
    return await run(rest);
  } catch (err) {
    // Under systemd the journal files these at error priority (log.ts).
    const prefix = journalPrefix('error');
    if (err instanceof CliError) {
      process.stderr.write(`${prefix}ubcache ${cmd}: ${err.message}\n`);
      if (err.hint) process.stderr.write(`${prefix}${err.hint}\n`);
      return err.status;
    }
    process.stderr.write(`${prefix}ubcache ${cmd}: ${errorMessage(err)}\n`);
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
