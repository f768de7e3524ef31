// Argument handling of `ubcache export`, in process. The daemon's life
// (listening, signals, exit status) is tested on the real process in
// test/e2e/cli.test.ts.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULT_LISTEN, parseExportArgs, parseListen } from '../../src/cli/export.ts';
import { CliError } from '../../src/cli/common.ts';

test('with neither --listen nor --socket it listens on 127.0.0.1:10809 only', () => {
  assert.deepEqual(DEFAULT_LISTEN, { host: '127.0.0.1', port: 10809 });
  assert.deepEqual(parseExportArgs(['disk.img']), {
    files: ['disk.img'],
    names: ['disk.img'],
    descriptions: [undefined],
    readOnly: false,
    listen: [{ host: '127.0.0.1', port: 10809 }],
    tls: { mode: 'off' },
  });
  const p = parseExportArgs(['--socket', '/run/s', 'a']);
  assert.ok(p !== 'help');
  assert.deepEqual(p.listen, [{ path: '/run/s' }]);
  const both = parseExportArgs(['--listen', '[::1]:0', '--socket', '/run/s', '--listen', '0.0.0.0:10809', 'a']);
  assert.ok(both !== 'help');
  assert.deepEqual(both.listen, [{ host: '::1', port: 0 }, { host: '0.0.0.0', port: 10809 }, { path: '/run/s' }]);
});

test('exports are named by --name in FILE order, else by base name; descriptions pair the same way', () => {
  const p = parseExportArgs([
    '--name',
    'first',
    '/a/one.img',
    '/b/two.img',
    '--description',
    'the first',
    '--read-only',
    '/c/three',
  ]);
  assert.ok(p !== 'help');
  assert.deepEqual(p.names, ['first', 'two.img', 'three']);
  assert.deepEqual(p.descriptions, ['the first', undefined, undefined]);
  assert.equal(p.readOnly, true);
  assert.equal(parseExportArgs(['-h']), 'help');
  assert.equal(parseExportArgs(['--help', 'x']), 'help');
});

test('argument errors are CliErrors that say what is wrong and what to do', () => {
  const bad = (args: string[], message: RegExp, hint: RegExp): void => {
    assert.throws(
      () => parseExportArgs(args),
      (err: unknown) => {
        assert.ok(err instanceof CliError, String(err));
        assert.match(err.message, message);
        assert.match(err.hint ?? '', hint);
        return true;
      },
    );
  };
  bad([], /no FILE to export/, /e\.g\. ubcache export disk\.img/);
  bad(['--name', 'a', '--name', 'b', 'f'], /2 --name options for 1 FILE/, /at most one per FILE/);
  bad(['--description', 'a', '--description', 'b', 'f'], /2 --description options/, /at most one per FILE/);
  bad(
    ['/x/disk', '/y/disk'],
    /two exports would be named 'disk' \(\/x\/disk and \/y\/disk\)/,
    /distinct names with --name/,
  );
  bad(['--bogus', 'f'], /Unknown option '--bogus'/, /ubcache export --help/);
  bad(['--listen'], /argument missing/, /ubcache export --help/);
  bad(['--socket', '', 'f'], /--socket needs a path/, /--help/);
  bad(['--listen', '10809', 'f'], /--listen '10809' is not HOST:PORT/, /--listen 127\.0\.0\.1:10809/);
});

test('--listen accepts HOST:PORT and [IPv6]:PORT and nothing else', () => {
  assert.deepEqual(parseListen('127.0.0.1:10809'), { host: '127.0.0.1', port: 10809 });
  assert.deepEqual(parseListen('localhost:0'), { host: 'localhost', port: 0 });
  assert.deepEqual(parseListen('[::]:10809'), { host: '::', port: 10809 });
  for (const spec of ['10809', 'host:', ':10809', 'host:65536', 'host:-1', 'a:b:1', '::1:10809', 'h:1x', '[::1]']) {
    assert.throws(() => parseListen(spec), CliError, spec);
  }
});
