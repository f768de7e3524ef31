// Run the built `bin/ubcache` as a real process: start `ubcache export ...`,
// wait for its "listening on" line, talk to it, stop it with SIGTERM and
// check it exits by itself with status 0. `npm test` builds dist/ first; a
// single test file run against a stale or missing build fails with a hint.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdtempSync, openSync, readSync, rmSync, watch } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const UBCACHE = join(ROOT, 'bin', 'ubcache');

function requireBuild(): void {
  if (!existsSync(join(ROOT, 'dist', 'cli', 'main.js'))) {
    throw new Error('dist/ is missing: run `npm run build` (npm test does it) before the end-to-end tests');
  }
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/**
 * `serve` without --control would use the one default control socket, and
 * tests run several daemons at once: give each its own, next to its
 * --socket (so it lives and goes with the test's temp dir).
 */
export function withControl(args: string[]): string[] {
  if (args[0] !== 'serve' || args.includes('--control')) return args;
  const i = args.indexOf('--socket');
  const socket = i >= 0 ? args[i + 1] : undefined;
  if (socket === undefined) return args;
  return [...args, '--control', `${socket}.control`];
}

export class Daemon {
  readonly proc: ChildProcess;
  /** Every stderr line so far. */
  readonly lines: string[] = [];
  readonly exited: Promise<Exit>;
  private waiters: { pattern: RegExp; resolve: (line: string) => void; reject: (e: Error) => void }[] = [];
  private partial = '';
  private exit: Exit | undefined;

  constructor(args: string[], env: NodeJS.ProcessEnv = {}) {
    requireBuild();
    this.proc = spawn(UBCACHE, withControl(args), {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...env },
    });
    this.proc.stderr?.setEncoding('utf8');
    this.proc.stderr?.on('data', (text: string) => {
      const parts = (this.partial + text).split('\n');
      this.partial = parts.pop() ?? '';
      for (const line of parts) this.onLine(line);
    });
    this.proc.stdout?.resume();
    this.exited = new Promise((resolve) => {
      this.proc.once('exit', (code, signal) => {
        if (this.partial !== '') this.onLine(this.partial);
        this.exit = { code, signal };
        const pending = this.waiters;
        this.waiters = [];
        for (const w of pending) {
          w.reject(
            new Error(`ubcache exited (${code ?? signal}) before logging ${w.pattern}; stderr:\n${this.stderr}`),
          );
        }
        resolve(this.exit);
      });
    });
  }

  get stderr(): string {
    return this.lines.join('\n');
  }

  private onLine(line: string): void {
    this.lines.push(line);
    const hit = this.waiters.filter((w) => w.pattern.test(line));
    this.waiters = this.waiters.filter((w) => !hit.includes(w));
    for (const w of hit) w.resolve(line);
  }

  /** The first stderr line (already seen or still to come) matching `pattern`. */
  waitForLine(pattern: RegExp): Promise<string> {
    const seen = this.lines.find((l) => pattern.test(l));
    if (seen !== undefined) return Promise.resolve(seen);
    if (this.exit) return Promise.reject(new Error(`ubcache has exited without logging ${pattern}:\n${this.stderr}`));
    return new Promise((resolve, reject) => this.waiters.push({ pattern, resolve, reject }));
  }

  /** Send a signal and wait for the process to exit. */
  async signal(signal: NodeJS.Signals = 'SIGTERM'): Promise<Exit> {
    if (!this.exit) this.proc.kill(signal);
    return this.exited;
  }

  /** SIGTERM, and the process must exit by itself with status 0 (no handle left behind). */
  async stop(): Promise<void> {
    const exit = await this.signal('SIGTERM');
    if (exit.code !== 0) {
      throw new Error(`ubcache export exited with ${exit.code ?? exit.signal} instead of 0; stderr:\n${this.stderr}`);
    }
  }

  /** For `finally` blocks: make sure the process is gone, whatever state the test left it in. */
  async kill(): Promise<void> {
    if (this.exit) return;
    this.proc.kill('SIGKILL');
    await this.exited;
  }
}

export interface ExportDaemon {
  daemon: Daemon;
  /** The unix socket it listens on. */
  socket: string;
  /** nbd+unix URI of an export. */
  uri: (name?: string) => string;
}

/**
 * Start `ubcache export --socket DIR/nbd.sock ARGS...` and wait until it
 * listens. `dir` holds the socket; the caller removes it.
 */
export async function startExport(dir: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<ExportDaemon> {
  const socket = join(dir, 'nbd.sock');
  const daemon = new Daemon(['export', '--socket', socket, ...args], env);
  await daemon.waitForLine(/listening on unix:/);
  return {
    daemon,
    socket,
    uri: (name = '') => `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`,
  };
}

/** Run `ubcache ARGS...` to completion. */
export function ubcache(args: string[]): { status: number | null; stdout: string; stderr: string } {
  requireBuild();
  const r = spawnSync(UBCACHE, withControl(args), { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** A temp directory removed by `using`. */
export function tempDir(prefix = 'ubcache-e2e-'): { dir: string; [Symbol.dispose](): void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return {
    dir,
    [Symbol.dispose]() {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Create (or resize) a sparse file of `size` bytes. */
export function sparseFile(path: string, size: number): string {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
  } finally {
    closeSync(fd);
  }
  return path;
}

/** `length` bytes of the file at `path` from byte `offset` (zeros past its end). */
export function readFileRange(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    readSync(fd, buf, 0, length, offset);
    return buf;
  } finally {
    closeSync(fd);
  }
}

/** Resolves once `path` exists (watching its directory; no polling). */
export function waitForFile(path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const watcher = watch(dirname(path), (_event, name) => {
      if ((name === null || name === basename(path)) && existsSync(path)) {
        watcher.close();
        resolve();
      }
    });
    watcher.on('error', (err) => {
      watcher.close();
      reject(err);
    });
    if (existsSync(path)) {
      watcher.close();
      resolve();
    }
  });
}

/**
 * Run a command to completion; resolve with its stdout, or reject with its
 * output unless it exits 0. Asynchronous, so the test keeps draining the
 * daemon's stderr while a long client run goes on.
 */
export function run(cmd: string, args: string[], options: { input?: Buffer | string } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (t: string) => (stdout += t));
    child.stderr.setEncoding('utf8').on('data', (t: string) => (stderr += t));
    child.on('error', (err) => {
      reject(new Error(`${cmd} could not run: ${err.message}`));
    });
    child.on('close', (code, signal) => {
      if (code === 0) resolve(stdout);
      else reject(new Error(`${cmd} ${args.join(' ')} exited with ${code ?? signal}:\n${stdout}\n${stderr}`));
    });
    child.stdin.end(options.input);
  });
}

/** Is `cmd` on the PATH? */
export function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}
