// fio's nbd engine: random writes at queue depth 32 verified with crc32c, on
// one connection and on two at once.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { run, sparseFile, startExport, tempDir } from '../helpers/daemon.ts';

const MiB = 1024 * 1024;

test('fio nbd engine: random writes with verify=crc32c read back intact', async () => {
  using tmp = tempDir();
  const f = sparseFile(join(tmp.dir, 'disk.img'), 64 * MiB);
  const { daemon, uri } = await startExport(tmp.dir, [f]);
  try {
    const common = [
      '--ioengine=nbd',
      `--uri=${uri('disk.img')}`,
      '--iodepth=32',
      '--verify=crc32c',
      '--do_verify=1',
      '--verify_fatal=1',
      '--verify_state_save=0', // else fio leaves *-verify.state files in the working directory
      '--output-format=json',
      `--directory=${tmp.dir}`,
    ];
    for (const job of [
      ['--name=randwrite-4k', '--rw=randwrite', '--bs=4k', '--size=32M'],
      ['--name=randwrite-mixed', '--rw=randwrite', '--bsrange=512-256k', '--size=48M', '--offset=8M'],
      ['--name=two-conns', '--rw=randwrite', '--bs=64k', '--size=16M', '--numjobs=2', '--offset_increment=24M'],
    ]) {
      const out = await run('fio', [...common, ...job]);
      const json = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { error: number; jobname: string }[] };
      for (const j of json.jobs) assert.equal(j.error, 0, `${j.jobname}: fio reported error ${j.error}`);
    }
  } finally {
    await daemon.stop().finally(() => daemon.kill());
  }
});
