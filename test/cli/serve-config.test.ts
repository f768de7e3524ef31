// `serve --config FILE`: what a file says becomes the plan (its [serve]
// options under the command line's, its devices first), and every bad file
// is refused with its line and the reason, before anything is opened.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CliError } from '../../src/cli/common.ts';
import { parseServeArgs, type ServePlan } from '../../src/cli/serve.ts';
import { parseServeConfig } from '../../src/daemon/config.ts';

function withConfig<T>(text: string, fn: (path: string, dir: string) => T): T {
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-config-'));
  try {
    const path = join(dir, 'ubcache.conf');
    writeFileSync(path, text);
    return fn(path, dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function plan(args: string[]): ServePlan {
  const p = parseServeArgs(args);
  assert.ok(p !== 'help');
  return p;
}

const UUID = '297d86d4-c8f5-44b0-99d9-c086cdac6ee5';

test('a config file: [serve] options under the command line, devices by path first, attributes by path and uuid', () => {
  const text = [
    '# ubcache.conf',
    '; another comment',
    '[serve]',
    'listen = 127.0.0.1:10900',
    'socket = /run/x.sock',
    'control = /run/ctl.sock',
    'read-only = yes',
    'exit-when-idle = no',
    '',
    '[cache "cache.img"]',
    'journal_delay_ms = 50',
    '[backing "/dev/sdb"]',
    'cache_mode = writeback',
    '  sequential_cutoff   =   0  ',
    `[backing "${UUID.toUpperCase()}"]`,
    'cache_mode = writearound',
    '[set]',
    'io_error_limit = 8',
  ].join('\n');
  withConfig(text, (path, dir) => {
    const p = plan(['--config', path, '--control', '/other.sock', 'disk2.img']);
    assert.deepEqual(p.devices, [join(dir, 'cache.img'), '/dev/sdb', 'disk2.img']);
    assert.deepEqual(p.listen, [{ host: '127.0.0.1', port: 10900 }, { path: '/run/x.sock' }]);
    assert.equal(p.control, '/other.sock', 'the command line wins');
    assert.equal(p.readOnly, true);
    assert.equal(p.exitWhenIdle, false);
    const sections = p.config?.sections.map((c) => ({
      target: c.target,
      where: c.where,
      settings: c.settings.map((s) => `${s.where} ${s.attribute}=${s.value}`),
    }));
    assert.deepEqual(sections, [
      {
        target: { kind: 'cache', path: join(dir, 'cache.img') },
        where: `${path}:10`,
        settings: [`${path}:11 journal_delay_ms=50`],
      },
      {
        target: { kind: 'backing', path: '/dev/sdb' },
        where: `${path}:12`,
        settings: [`${path}:13 cache_mode=writeback`, `${path}:14 sequential_cutoff=0`],
      },
      {
        target: { kind: 'backing-uuid', uuid: UUID },
        where: `${path}:15`,
        settings: [`${path}:16 cache_mode=writearound`],
      },
      { target: { kind: 'sets' }, where: `${path}:17`, settings: [`${path}:18 io_error_limit=8`] },
    ]);
  });
});

test('bad config files are refused with the line and the reason', () => {
  const cases: Array<[string, RegExp]> = [
    ['[serve]\nlisten = nowhere', /:2: --listen 'nowhere' is not HOST:PORT/],
    ['[serve]\nport = 1', /:2: \[serve\] has no key 'port'; valid: listen, socket/],
    ['[serve]\ncontrol = /a\ncontrol = /b', /:3: control is already set at .*:2/],
    ['[serve]\nread-only = maybe', /:2: read-only = maybe: write yes or no/],
    ['[serve]\nshutdown-timeout = soon', /:2: --shutdown-timeout 'soon' is not a duration/],
    ['cache_mode = writeback', /:1: cache_mode comes before any section/],
    ['[backing "/dev/sdb"]\ncache_mode = fast', /:2: cache_mode: "fast" is not one of: writethrough, writeback/],
    ['[backing "/dev/sdb"]\ncache_size = 1', /:2: a backing device has no settable attribute "cache_size"/],
    ['[cache "/c.img"]\ncache_mode = writeback', /:2: a cache set has no settable attribute "cache_mode"/],
    ['[backing "/dev/sdb"]\ncache_mode = writeback # fast', /:2: cache_mode: "writeback # fast" is not one of/],
    ['[backing "/dev/sdb"]\ncache_mode', /:2: 'cache_mode' is not KEY = VALUE/],
    ['[backing "/dev/sdb"]\ncache_mode =', /:2: cache_mode has no value/],
    [
      '[backing "/dev/sdb"]\nwriteback_percent = 10\nwriteback_percent = 20',
      /:3: writeback_percent is already set at .*:2/,
    ],
    ['[backing "/dev/sdb"]\n[backing "/dev/sdb"]', /:2: section \[backing "\/dev\/sdb"\] repeats the one at .*:1/],
    ['[backing]', /:1: \[backing\] needs the device: \[backing "PATH"\] or \[backing "UUID"\]/],
    [`[cache "${UUID}"]`, /:1: \[cache "[0-9a-f-]+"\]: for a cache set by uuid write \[set "/],
    ['[set "nope"]', /:1: \[set "nope"\]: not a cache set uuid/],
    ['[disk "/dev/sdb"]', /:1: unknown section \[disk\]; valid: \[serve\], \[cache "PATH"\]/],
    ['[serve', /:1: '\[serve' is not a section header/],
    ['[serve "x"]', /:1: \[serve\] takes no name/],
    ['[serve]\nListen = x', /:2: 'Listen' is not a key/],
  ];
  for (const [text, pattern] of cases) {
    withConfig(text, (path) => {
      assert.throws(
        () => parseServeArgs(['--config', path]),
        (e: unknown) => e instanceof CliError && pattern.test(e.message) && e.message.startsWith(path),
        `${JSON.stringify(text)} should fail with ${pattern}`,
      );
    });
  }
  assert.throws(
    () => parseServeArgs(['--config', '/nonexistent/ubcache.conf']),
    /cannot read the config file \/nonexistent\/ubcache\.conf: .*ENOENT|no such file/i,
  );
});

test('the shipped example config parses', () => {
  const path = join(import.meta.dirname, '..', '..', 'contrib', 'ubcache.conf');
  const p = plan(['--config', path]);
  assert.deepEqual(p.devices, ['/var/lib/ubcache/cache.img', '/dev/disk/by-id/ata-EXAMPLE-DISK']);
  assert.equal(parseServeConfig('', 'empty.conf').sections.length, 0);
});
