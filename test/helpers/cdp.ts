// A headless Chromium driven over the DevTools protocol, through
// --remote-debugging-pipe: the browser reads commands from fd 3 and writes
// replies and events to fd 4, each a JSON message ended by a NUL byte. No
// port, no WebSocket, no npm package pinned to a browser build: Debian's
// chromium and these few lines are all the dashboard's test needs.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';

/** The browser to run: $UBCACHE_CHROMIUM, else Debian's `chromium` from PATH; undefined when there is none. */
export function findChromium(): string | undefined {
  const fromEnv = process.env['UBCACHE_CHROMIUM'];
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  const r = spawnSync('sh', ['-c', 'command -v chromium'], { encoding: 'utf8' });
  const path = r.stdout.trim();
  return r.status === 0 && path !== '' ? path : undefined;
}

type Json = Record<string, unknown>;
type Listener = (params: Json, sessionId: string | undefined) => void;

interface Pending {
  method: string;
  resolve: (result: Json) => void;
  reject: (err: Error) => void;
}

export class Browser {
  private readonly proc: ChildProcess;
  private readonly input: Writable;
  private readonly pending = new Map<number, Pending>();
  private readonly listeners = new Map<string, Set<Listener>>();
  private nextId = 1;
  private buffered = Buffer.alloc(0);
  private readonly exited: Promise<void>;
  private stderr = '';

  private constructor(proc: ChildProcess) {
    this.proc = proc;
    const input = proc.stdio[3];
    const output = proc.stdio[4];
    if (!input || !output) throw new Error('chromium was started without its pipe file descriptors');
    this.input = input as Writable;
    (output as Readable).on('data', (chunk: Buffer) => {
      this.onData(chunk);
    });
    proc.stderr?.setEncoding('utf8');
    proc.stderr?.on('data', (t: string) => {
      // Kept for the message if the browser dies; bounded.
      this.stderr = (this.stderr + t).slice(-4000);
    });
    this.exited = new Promise((resolve) => {
      proc.once('exit', (code, signal) => {
        const err = new Error(`chromium exited (${code ?? signal}); its stderr ends:\n${this.stderr}`);
        for (const p of this.pending.values()) p.reject(err);
        this.pending.clear();
        resolve();
      });
    });
  }

  /** Start a headless browser with its own profile in `userDataDir`. */
  static launch(binary: string, userDataDir: string): Browser {
    const proc = spawn(
      binary,
      [
        '--headless',
        '--remote-debugging-pipe',
        // Root in CI and containers: Chromium refuses to run sandboxed as root.
        '--no-sandbox',
        '--disable-gpu',
        '--disable-dev-shm-usage',
        '--no-first-run',
        '--no-default-browser-check',
        '--disable-extensions',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--hide-scrollbars',
        '--mute-audio',
        `--user-data-dir=${userDataDir}`,
        'about:blank',
      ],
      { stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe'] },
    );
    return new Browser(proc);
  }

  private onData(chunk: Buffer): void {
    this.buffered = Buffer.concat([this.buffered, chunk]);
    let end: number;
    while ((end = this.buffered.indexOf(0)) >= 0) {
      const text = this.buffered.subarray(0, end).toString('utf8');
      this.buffered = this.buffered.subarray(end + 1);
      const msg = JSON.parse(text) as {
        id?: number;
        method?: string;
        params?: Json;
        result?: Json;
        error?: { message: string };
        sessionId?: string;
      };
      if (msg.id !== undefined) {
        const p = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        if (!p) continue;
        if (msg.error) p.reject(new Error(`${p.method}: ${msg.error.message}`));
        else p.resolve(msg.result ?? {});
      } else if (msg.method !== undefined) {
        for (const l of this.listeners.get(msg.method) ?? []) l(msg.params ?? {}, msg.sessionId);
      }
    }
  }

  /** A protocol command; `sessionId` addresses a page attached with attach(). */
  send(method: string, params: Json = {}, sessionId?: string): Promise<Json> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { method, resolve, reject });
      this.input.write(`${JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) })}\0`);
    });
  }

  on(method: string, listener: Listener): void {
    let set = this.listeners.get(method);
    if (!set) {
      set = new Set();
      this.listeners.set(method, set);
    }
    set.add(listener);
  }

  /** The next `method` event of `sessionId`. */
  once(method: string, sessionId: string): Promise<Json> {
    return new Promise((resolve) => {
      const l: Listener = (params, sid) => {
        if (sid !== sessionId) return;
        this.listeners.get(method)?.delete(l);
        resolve(params);
      };
      this.on(method, l);
    });
  }

  /** A new page (tab), attached: its session id. */
  async newPage(): Promise<string> {
    const { targetId } = (await this.send('Target.createTarget', { url: 'about:blank' })) as { targetId: string };
    const { sessionId } = (await this.send('Target.attachToTarget', { targetId, flatten: true })) as {
      sessionId: string;
    };
    return sessionId;
  }

  /**
   * Evaluate `expression` in the page (awaiting it if it is a promise) and
   * return its value, which must be JSON; a thrown exception rejects.
   */
  async evaluate<T>(sessionId: string, expression: string): Promise<T> {
    const r = (await this.send(
      'Runtime.evaluate',
      { expression, awaitPromise: true, returnByValue: true },
      sessionId,
    )) as { result: { value?: unknown }; exceptionDetails?: { text: string; exception?: { description?: string } } };
    if (r.exceptionDetails) {
      throw new Error(
        `in the page: ${r.exceptionDetails.exception?.description ?? r.exceptionDetails.text} (evaluating ${expression.slice(0, 80)})`,
      );
    }
    return r.result.value as T;
  }

  /** Close the browser and wait for it to exit (killing it if it does not answer). */
  async close(): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.send('Browser.close').catch(() => {
      // It exits before answering, or is gone already.
    });
    const killer = setTimeout(() => this.proc.kill('SIGKILL'), 10_000);
    await this.exited;
    clearTimeout(killer);
  }
}
