// `ubcache serve` under systemd's protocols, driven without systemd itself:
// systemd-socket-activate (package systemd) opens the NBD listener and starts
// serve on the first client with LISTEN_FDS, as a .socket unit would; a
// notify socket written here (a unix datagram socket, in python3: Node has
// none) receives READY=1, STATUS= and STOPPING=1 as a Type=notify unit's
// manager would; and with JOURNAL_STREAM naming its stderr, every log line
// carries the journal's priority.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, fstatSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadNative } from '../../src/blockdev/native.ts';
import { have, tempDir, UBCACHE } from '../helpers/daemon.ts';
import { Client, makeImages } from './serve-helpers.ts';

/** Lines of a child's stream, and waiting for one that matches. */
class Lines {
  readonly lines: string[] = [];
  private waiters: Array<{ pattern: RegExp; resolve: (line: string) => void }> = [];
  private partial = '';
  constructor(stream: NodeJS.ReadableStream) {
    stream.setEncoding('utf8');
    stream.on('data', (t: string) => {
      const parts = (this.partial + t).split('\n');
      this.partial = parts.pop() ?? '';
      for (const line of parts) {
        this.lines.push(line);
        const hit = this.waiters.filter((w) => w.pattern.test(line));
        this.waiters = this.waiters.filter((w) => !hit.includes(w));
        for (const w of hit) w.resolve(line);
      }
    });
  }
  waitFor(pattern: RegExp): Promise<string> {
    const seen = this.lines.find((l) => pattern.test(l));
    if (seen !== undefined) return Promise.resolve(seen);
    return new Promise((resolve) => this.waiters.push({ pattern, resolve }));
  }
}

/** A notify socket: python3 binds a datagram socket and prints each message as one JSON line. */
function notifyListener(path: string): { proc: ChildProcess; messages: Lines; bound: Promise<string> } {
  const script = [
    'import json, socket, sys',
    's = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)',
    's.bind(sys.argv[1])',
    'print("bound", flush=True)',
    'while True:',
    '    print(json.dumps(s.recv(65536).decode()), flush=True)',
  ].join('\n');
  const proc = spawn('python3', ['-c', script, path], { stdio: ['ignore', 'pipe', 'inherit'] });
  const messages = new Lines(proc.stdout as NodeJS.ReadableStream);
  return { proc, messages, bound: messages.waitFor(/^bound$/) };
}

const missing = ['systemd-socket-activate', 'python3'].filter((c) => !have(c));
const skip = missing.length > 0 ? `needs ${missing.join(', ')} (apt-get install systemd python3)` : false;
// serve sends READY=1 through the native addon; without it (no C compiler at build) it warns and cannot notify.
const noAddon = loadNative()?.notifySend == null ? 'needs the native addon (npm run build with a C compiler)' : false;

test(
  'socket activation and notify: the first client starts serve on the passed socket, READY=1 with a status, STOPPING=1 at SIGTERM',
  { skip: skip || noAddon, timeout: 120_000 },
  async () => {
    using tmp = tempDir();
    const { cache, backing } = makeImages(tmp.dir, { args: ['--writeback'] });
    const socket = join(tmp.dir, 'nbd.sock');
    const notifyPath = join(tmp.dir, 'notify.sock');
    const notify = notifyListener(notifyPath);
    try {
      await notify.bound;
      const activator = spawn(
        'systemd-socket-activate',
        [
          '-l',
          socket,
          '-E',
          `NOTIFY_SOCKET=${notifyPath}`,
          UBCACHE,
          'serve',
          '--control',
          join(tmp.dir, 'control.sock'),
          cache,
          backing,
        ],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      );
      const stderr = new Lines(activator.stderr as NodeJS.ReadableStream);
      const exited = new Promise<number | null>((resolve) => activator.once('exit', resolve));
      try {
        await stderr.waitFor(/Listening on .*nbd\.sock as 3/);
        assert.equal(
          stderr.lines.some((l) => /^ubcache:/.test(l)),
          false,
          'serve is not started before a client comes',
        );
        // This connection starts serve; the handshake completes once serve accepts on fd 3.
        const c = await Client.connect(socket);
        const listening = await stderr.waitFor(/ubcache: listening on /);
        assert.match(listening, /listening on fd 3 \(socket activation\) \(exports: bcache0\)/);
        const ready = await notify.messages.waitFor(/READY=1/);
        assert.match(
          JSON.parse(ready) as string,
          /^READY=1\nSTATUS=serving bcache0 \(writeback, clean\); 1 cache set; dirty 0\.0k; hit ratio -$/,
        );
        await c.write(0, Buffer.alloc(64 * 1024, 0x33));
        await c.flush();
        assert.ok((await c.read(0, 4096)).equals(Buffer.alloc(4096, 0x33)));
        c.close();
        activator.kill('SIGTERM');
        const stopping = await notify.messages.waitFor(/STOPPING=1/);
        assert.equal(JSON.parse(stopping), 'STOPPING=1\nSTATUS=shutting down');
        assert.equal(await exited, 0, stderr.lines.join('\n'));
      } finally {
        activator.kill('SIGKILL');
      }
    } finally {
      notify.proc.kill();
    }
  },
);

test(
  'socket activation refuses listener options; LISTEN_PID of another process is not for serve',
  { skip, timeout: 60_000 },
  () => {
    using tmp = tempDir();
    const env = { ...process.env, LISTEN_FDS: '1', LISTEN_PID: '1' };
    // LISTEN_PID names another process: serve listens itself, here privately, and --run ends it.
    const other = spawnSync(UBCACHE, ['serve', '-U', '-', '--control', join(tmp.dir, 'c'), '--run', 'true'], {
      env,
      encoding: 'utf8',
    });
    assert.equal(other.status, 0, other.stderr);
    assert.match(other.stderr, /listening on unix:.*\/socket \(exports: none yet\)/);
    // Ours (sh -c exec keeps the pid): options that name a listener are refused.
    const ours = spawnSync(
      'sh',
      [
        '-c',
        `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve --socket "$1" --control "$2"`,
        UBCACHE,
        join(tmp.dir, 's'),
        join(tmp.dir, 'c'),
      ],
      { encoding: 'utf8' },
    );
    assert.equal(ours.status, 1);
    assert.match(ours.stderr, /socket activation \(LISTEN_FDS\) passed the listening sockets: --listen, --socket/);
  },
);

test(
  'JOURNAL_STREAM naming stderr: every line carries its journal priority; naming something else: none',
  { timeout: 60_000 },
  () => {
    using tmp = tempDir();
    const runWith = (
      journal: (dev: bigint, ino: bigint) => string,
      args: string[],
    ): { status: number | null; text: string } => {
      const file = join(tmp.dir, 'stderr.txt');
      const fd = openSync(file, 'w');
      try {
        const st = fstatSync(fd, { bigint: true });
        const r = spawnSync(UBCACHE, args, {
          stdio: ['ignore', 'ignore', fd],
          env: { ...process.env, JOURNAL_STREAM: journal(st.dev, st.ino) },
        });
        return { status: r.status, text: readFileSync(file, 'utf8') };
      } finally {
        closeSync(fd);
      }
    };
    const serve = ['serve', '-U', '-', '--control', join(tmp.dir, 'c'), '--run', 'exit 3'];
    const ok = runWith((dev, ino) => `${dev}:${ino}`, serve);
    assert.equal(ok.status, 3, ok.text);
    const lines = ok.text.trimEnd().split('\n');
    assert.ok(lines.length >= 3, ok.text);
    for (const l of lines) assert.match(l, /^<[3467]>ubcache/, l);
    assert.ok(lines.some((l) => /^<6>ubcache: listening on unix:/.test(l)));
    const missingDevice = runWith(
      (dev, ino) => `${dev}:${ino}`,
      ['serve', '--control', join(tmp.dir, 'c'), join(tmp.dir, 'none.img')],
    );
    assert.equal(missingDevice.status, 1);
    assert.match(missingDevice.text, /^<3>ubcache serve: cannot register .*none\.img/m);
    // Inherited by a process whose stderr is not the journal's: plain lines.
    const other = runWith((dev, ino) => `${dev}:${ino + 1n}`, serve);
    assert.equal(other.status, 3);
    assert.match(other.text, /^ubcache: listening on unix:/m);
    assert.doesNotMatch(other.text, /^</m);
  },
);
