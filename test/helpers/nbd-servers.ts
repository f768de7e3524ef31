// Real NBD servers for client tests, each started by the test on a unix
// socket in its temp directory and stopped (by its own pid) at the end:
// nbdkit (with plugins and filters), qemu-nbd and Debian's nbd-server.
// Readiness comes from the server itself: nbdkit writes its -P pid file once
// it listens, qemu-nbd --fork exits its parent once the server runs.

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, watch, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { NbdClient, type NbdClientOptions } from '../../src/nbd/client.ts';
import { have, waitForFile } from './daemon.ts';

export interface ServerProcess {
  /** nbd+unix URI of an export (default: the one the server was started with). */
  uri(name?: string): string;
  socket: string;
  /** Everything the server wrote on stderr so far. */
  stderr(): string;
  /** SIGTERM and wait for the exit. Idempotent. */
  stop(): Promise<void>;
}

export interface ChildServer extends ServerProcess {
  /** SIGKILL: the server vanishes without closing anything (nbdkit waits for its clients on SIGTERM). */
  kill(): Promise<void>;
}

export const tools = {
  nbdkit: have('nbdkit'),
  qemuNbd: have('qemu-nbd'),
  nbdServer: have('nbd-server'),
};

function unixUri(socket: string, name: string): string {
  return `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`;
}

/**
 * Collect a child's stderr and resolve `exited` once it has exited and its
 * output is all read ('close'), or at its exit alone for qemu-nbd --fork,
 * whose daemon keeps the parent's stderr.
 */
function watchChild(
  child: ChildProcess,
  event: 'close' | 'exit' = 'close',
): { stderr: () => string; exited: Promise<number | null> } {
  let text = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (t: string) => (text += t));
  child.stdout?.resume();
  const exited = new Promise<number | null>((resolve) => {
    child.once(event, (code: number | null) => {
      resolve(code);
    });
  });
  return { stderr: () => text, exited };
}

/** Wait for `ready` unless the process exits first (then fail with its stderr). */
async function readyOrExit(what: string, ready: Promise<void>, exited: Promise<number | null>, stderr: () => string) {
  const outcome = await Promise.race([ready.then(() => 'ready' as const), exited.then((code) => code)]);
  if (outcome !== 'ready') throw new Error(`${what} exited (${outcome}) before it was ready:\n${stderr()}`);
}

function stopper(
  child: ChildProcess,
  exited: Promise<number | null>,
  signal: NodeJS.Signals = 'SIGTERM',
): () => Promise<void> {
  return async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    await exited;
  };
}

/**
 * `nbdkit -f -U DIR/NAME.sock ARGS...` (plugin, its parameters, filters).
 * With `log`, the log filter is added and log() returns its lines.
 */
export async function startNbdkit(
  dir: string,
  args: string[],
  options: { name?: string; log?: boolean } = {},
): Promise<ChildServer & { log(): string }> {
  const name = options.name ?? 'nbdkit';
  const socket = join(dir, `${name}.sock`);
  const pidFile = join(dir, `${name}.pid`);
  const logFile = join(dir, `${name}.log`);
  const logArgs = options.log === true ? ['--filter=log'] : [];
  const params = options.log === true ? [`logfile=${logFile}`] : [];
  const child = spawn('nbdkit', ['-f', '-U', socket, '-P', pidFile, ...logArgs, ...args, ...params], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const { stderr, exited } = watchChild(child);
  await readyOrExit('nbdkit', waitForFile(pidFile), exited, stderr);
  return {
    socket,
    uri: (exportName = '') => unixUri(socket, exportName),
    stderr,
    stop: stopper(child, exited),
    kill: stopper(child, exited, 'SIGKILL'),
    log: () => {
      try {
        return readFileSync(logFile, 'utf8');
      } catch {
        return '';
      }
    },
  };
}

/** `qemu-nbd --fork` serving a raw file; its parent exits once the server listens. */
export async function startQemuNbd(dir: string, file: string, extra: string[] = []): Promise<ServerProcess> {
  const socket = join(dir, 'qemu-nbd.sock');
  const pidFile = join(dir, 'qemu-nbd.pid');
  const parent = spawn(
    'qemu-nbd',
    ['--fork', '--persistent', '--shared=8', '-f', 'raw', '-k', socket, '--pid-file', pidFile, ...extra, file],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const { stderr, exited } = watchChild(parent, 'exit');
  const code = await exited;
  if (code !== 0) throw new Error(`qemu-nbd failed (${code}):\n${stderr()}`);
  const pid = Number(readFileSync(pidFile, 'utf8').trim());
  if (!Number.isSafeInteger(pid) || pid <= 1) throw new Error(`qemu-nbd wrote no usable pid to ${pidFile}`);
  let stopped: Promise<void> | undefined;
  return {
    socket,
    uri: (exportName = '') => unixUri(socket, exportName),
    stderr,
    stop: () =>
      (stopped ??= (async () => {
        try {
          process.kill(pid, 'SIGTERM');
        } catch {
          return; // already gone
        }
        // The forked server is not our child: it removes its socket as it exits (its pid file stays).
        await waitForGone(socket);
      })()),
  };
}

/** Resolves once `path` no longer exists (watching its directory). */
function waitForGone(path: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const w = watch(dirname(path), (_e, name) => {
      if ((name === null || name === basename(path)) && !existsSync(path)) {
        w.close();
        resolve();
      }
    });
    w.on('error', (err) => {
      w.close();
      reject(err);
    });
    if (!existsSync(path)) {
      w.close();
      resolve();
    }
  });
}

/**
 * Debian's nbd-server in the foreground (-d, which serves one client and then
 * exits) with a config file written here: one export named `name`.
 */
export async function startNbdServer(
  dir: string,
  file: string,
  name = 'disk',
): Promise<ServerProcess & { exited: Promise<number | null> }> {
  const socket = join(dir, 'nbd-server.sock');
  const conf = join(dir, 'nbd-server.conf');
  writeFileSync(
    conf,
    `[generic]\n    unixsock = ${socket}\n    allowlist = true\n` +
      `[${name}]\n    exportname = ${file}\n    flush = true\n    fua = true\n    trim = true\n`,
  );
  const child = spawn('nbd-server', ['-C', conf, '-d'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const { stderr, exited } = watchChild(child);
  await readyOrExit('nbd-server', waitForFile(socket), exited, stderr);
  return {
    socket,
    uri: (exportName = name) => unixUri(socket, exportName),
    stderr,
    stop: stopper(child, exited),
    exited,
  };
}

/**
 * Connect to a server that has created its socket but perhaps not yet called
 * listen() (nbd-server binds, then listens, and says nothing in between):
 * retry a refused connection a bounded number of times. Only for nbd-server,
 * which gives no readiness signal and serves a single connection in -d mode,
 * so a probe connection cannot be used instead.
 */
export async function connectWhenListening(uri: string, options: NbdClientOptions = {}): Promise<NbdClient> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await NbdClient.connect(uri, options);
    } catch (err) {
      if (attempt >= 200 || !String(err).includes('ECONNREFUSED')) throw err;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }
}
