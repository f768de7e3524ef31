// The service pieces of `serve` that need no process: nbdkit's options as
// parsed, socket activation's variables, the notify messages, --run's
// variables and the journal check.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseServeArgs, type ServePlan } from '../../src/cli/serve.ts';
import { CliError } from '../../src/cli/common.ts';
import { captiveEnv, exportVariable } from '../../src/daemon/captive.ts';
import { notifierFromEnv, statusMessage } from '../../src/daemon/notify.ts';
import { listenFdsFromEnv, SocketActivationError } from '../../src/daemon/socket-activation.ts';
import { captureLog, stderrIsJournal } from '../../src/util/log.ts';

function plan(args: string[]): ServePlan {
  const p = parseServeArgs(args);
  assert.ok(p !== 'help');
  return p;
}

test("nbdkit's options: -U, -p, -i, -r, -P, -f, -v, -V, --run, --exit-with-parent, --exit-when-idle", () => {
  const empty = plan([]);
  assert.deepEqual(empty.devices, [], 'no device: an empty daemon');
  assert.deepEqual(empty.listen, [{ host: '127.0.0.1', port: 10809 }]);
  assert.equal(empty.listenGiven, false);
  assert.equal(empty.exitWhenIdle, false);
  const p = plan([
    '-U',
    '/run/a.sock',
    '-U',
    '-',
    '-p',
    '10900',
    '-r',
    '-P',
    '/run/p',
    '-f',
    '-v',
    '--run',
    'qemu-img info "$uri"',
    '--exit-with-parent',
    'd.img',
  ]);
  assert.deepEqual(p.listen, [{ host: '127.0.0.1', port: 10900 }, { path: '/run/a.sock' }]);
  assert.equal(p.privateSocket, true);
  assert.equal(p.listenGiven, true);
  assert.equal(p.readOnly, true);
  assert.equal(p.pidfile, '/run/p');
  assert.equal(p.verbose, true);
  assert.equal(p.run, 'qemu-img info "$uri"');
  assert.equal(p.exitWithParent, true);
  assert.deepEqual(plan(['-i', '::1']).listen, [{ host: '::1', port: 10809 }]);
  assert.deepEqual(plan(['-i', '[::1]', '-p', '1']).listen, [{ host: '::1', port: 1 }]);
  assert.deepEqual(plan(['-U', '-']).listen, [], 'only the private socket, added at start');
  assert.equal(plan(['--readonly']).readOnly, true);
  assert.equal(plan(['-V']).version, true);
  assert.equal(plan(['--exit-when-idle', 'd.img']).exitWhenIdle, true);
  const refused: Array<[string[], RegExp]> = [
    [['-p', 'http'], /-p\/--port 'http' is not a TCP port number/],
    [['-p', '70000'], /-p\/--port '70000' is not a TCP port number/],
    [['--run', ''], /--run needs a command/],
    [['-P', ''], /--pidfile needs a path/],
    [['--exit-when-idle'], /no DEVICE to register, and --exit-when-idle would exit at once/],
    [['-x'], /Unknown option '-x'/],
  ];
  for (const [args, pattern] of refused) {
    assert.throws(
      () => parseServeArgs(args),
      (e: unknown) => e instanceof CliError && pattern.test(e.message),
      args.join(' '),
    );
  }
});

test('socket activation: LISTEN_FDS for this pid gives fds from 3; the variables are removed; bad values refused', () => {
  const env: NodeJS.ProcessEnv = { LISTEN_FDS: '2', LISTEN_PID: '42', LISTEN_FDNAMES: 'a:b', OTHER: 'x' };
  assert.deepEqual(listenFdsFromEnv(env, 42), [3, 4]);
  assert.deepEqual(env, { OTHER: 'x' });
  assert.deepEqual(listenFdsFromEnv({ LISTEN_FDS: '1', LISTEN_PID: '41' }, 42), [], 'meant for another process');
  assert.deepEqual(listenFdsFromEnv({}, 42), []);
  for (const [fds, pid, pattern] of [
    ['x', '42', /LISTEN_FDS=x is not a count/],
    ['1', 'me', /LISTEN_PID=me is not a process id/],
    ['0', '42', /LISTEN_FDS=0/],
    ['65', '42', /more sockets than serve takes/],
  ] as const) {
    assert.throws(
      () => listenFdsFromEnv({ LISTEN_FDS: fds, LISTEN_PID: pid }, 42),
      (e: unknown) => e instanceof SocketActivationError && pattern.test(e.message),
    );
  }
});

test('notify: messages go to $NOTIFY_SOCKET, which is removed from the environment; a failing socket is reported once', () => {
  const sent: Array<[string, string]> = [];
  const env: NodeJS.ProcessEnv = { NOTIFY_SOCKET: '@/org/example/notify' };
  const n = notifierFromEnv(env, (a, m) => sent.push([a, m]));
  assert.ok(n);
  assert.equal(env['NOTIFY_SOCKET'], undefined);
  n.send('READY=1');
  n.send(statusMessage('two\nlines'));
  assert.deepEqual(sent, [
    ['@/org/example/notify', 'READY=1'],
    ['@/org/example/notify', 'STATUS=two lines'],
  ]);
  assert.equal(
    notifierFromEnv({}, () => undefined),
    undefined,
  );
  const log = captureLog();
  try {
    assert.equal(
      notifierFromEnv({ NOTIFY_SOCKET: 'vsock:2:1' }, () => undefined),
      undefined,
    );
    const failing = notifierFromEnv({ NOTIFY_SOCKET: '/run/gone' }, () => {
      throw new Error('ECONNREFUSED');
    });
    failing?.send('STATUS=a');
    failing?.send('STATUS=b');
  } finally {
    log.restore();
  }
  assert.deepEqual(log.lines, [
    'warn: NOTIFY_SOCKET=vsock:2:1: only unix socket paths and abstract names (@...) are supported; not notifying',
    'warn: cannot notify systemd on /run/gone: ECONNREFUSED',
  ]);
});

test("--run's variables: a unix socket preferred for $uri, one $uri_NAME per export, TLS as nbdkit sets it", () => {
  assert.deepEqual(
    captiveEnv({
      listeners: [{ host: '127.0.0.1', port: 10809 }, { path: '/tmp/d/socket' }],
      exports: ['bcache0', 'bcache1'],
      tls: 'off',
    }),
    {
      uri: 'nbd+unix:///bcache0?socket=/tmp/d/socket',
      nbd: 'nbd+unix:///bcache0?socket=/tmp/d/socket',
      uri_bcache0: 'nbd+unix:///bcache0?socket=/tmp/d/socket',
      uri_bcache1: 'nbd+unix:///bcache1?socket=/tmp/d/socket',
      unixsocket: '/tmp/d/socket',
      port: '10809',
      exportname: 'bcache0',
    },
  );
  assert.deepEqual(captiveEnv({ listeners: [{ host: '::1', port: 1 }], exports: [], tls: 'require' }), {
    uri: 'nbds://[::1]:1/',
    nbd: 'nbds://[::1]:1/',
    unixsocket: '',
    port: '1',
    exportname: '',
    tls: '2',
  });
  assert.equal(exportVariable('my-disk.0'), 'uri_my_disk_0');
});

test("the journal's prefixes only when JOURNAL_STREAM is stderr's own device and inode", () => {
  const stat = () => ({ dev: 2049n, ino: 77n });
  assert.equal(stderrIsJournal({ JOURNAL_STREAM: '2049:77' }, stat), true);
  assert.equal(stderrIsJournal({ JOURNAL_STREAM: '2049:78' }, stat), false);
  assert.equal(stderrIsJournal({}, stat), false);
  assert.equal(
    stderrIsJournal({ JOURNAL_STREAM: '2049:77' }, () => {
      throw new Error('EBADF');
    }),
    false,
  );
});
