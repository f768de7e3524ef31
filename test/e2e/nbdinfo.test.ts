// nbdinfo, the libnbd probe, sees every flag we advertise, and only those the
// device can back.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { FileBlockDevice } from '../../src/blockdev/file.ts';
import { run, sparseFile, startExport, tempDir } from '../helpers/daemon.ts';

const MiB = 1024 * 1024;

interface Info {
  'export-name': string;
  description?: string;
  contexts: string[];
  is_rotational: boolean;
  is_read_only: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
  'export-size': number;
}

async function info(uri: string): Promise<{ protocol: string; structured: boolean; exports: Info[] }> {
  return JSON.parse(await run('nbdinfo', ['--json', uri])) as {
    protocol: string;
    structured: boolean;
    exports: Info[];
  };
}

test('nbdinfo: a writable file export advertises flush, FUA, multi-conn, cache, zero, and trim/fast-zero as the file allows', async () => {
  using tmp = tempDir();
  const f = sparseFile(join(tmp.dir, 'disk.img'), 32 * MiB);
  const probe = await FileBlockDevice.open(f);
  const caps = { ...probe.caps };
  await probe.close();
  const { daemon, uri } = await startExport(tmp.dir, ['--description', 'test disk', f]);
  try {
    const out = await info(uri('disk.img'));
    assert.equal(out.protocol, 'newstyle-fixed');
    assert.equal(out.structured, true);
    const e = out.exports[0];
    assert.ok(e);
    assert.equal(e['export-name'], 'disk.img');
    assert.equal(e.description, 'test disk');
    assert.equal(e['export-size'], 32 * MiB);
    assert.deepEqual(e.contexts, ['base:allocation']);
    assert.deepEqual(
      {
        flush: e.can_flush,
        fua: e.can_fua,
        multiConn: e.can_multi_conn,
        cache: e.can_cache,
        zero: e.can_zero,
        df: e.can_df,
        readOnly: e.is_read_only,
        trim: e.can_trim,
        fastZero: e.can_fast_zero,
        rotational: e.is_rotational,
      },
      {
        flush: true,
        fua: true,
        multiConn: true,
        cache: true,
        zero: true,
        df: false,
        readOnly: false,
        trim: caps.discard,
        fastZero: caps.fastZero,
        rotational: caps.rotational,
      },
    );
    assert.deepEqual([e.block_size_minimum, e.block_size_preferred, e.block_size_maximum], [1, 4096, 32 * MiB]);
  } finally {
    await daemon.stop().finally(() => daemon.kill());
  }
});

test('nbdinfo: a read-only export advertises READ_ONLY and no trim or zero', async () => {
  using tmp = tempDir();
  const f = sparseFile(join(tmp.dir, 'ro.img'), MiB);
  const { daemon, uri } = await startExport(tmp.dir, ['--read-only', f]);
  try {
    const [e] = (await info(uri('ro.img'))).exports;
    assert.ok(e);
    assert.equal(e.is_read_only, true);
    assert.equal(e.can_trim, false);
    assert.equal(e.can_zero, false);
    assert.equal(e.can_fast_zero, false);
    assert.equal(e.can_flush, true);
    assert.equal(e.can_multi_conn, true);
  } finally {
    await daemon.stop().finally(() => daemon.kill());
  }
});
