// The kernel's verdict on `ubcache flush` (one VM boot): the kernel left
// these images dirty (test/fixtures/kernel: wb-stopped, stopped with dirty
// data; wb-crash, reset with keys only in its journal); ubcache flush wrote
// them back offline. Linux then registers each flushed backing device alone,
// without its cache: its superblock says clean, and once run (`running`, as
// an operator does for a backing device whose cache is gone) /dev/bcacheN
// reads exactly what the kernel itself serves from the original images with
// their cache, which it registers afterwards in the same boot. (Writing 0
// to writeback_running does not hold the kernel's writeback off here:
// attaching a dirty backing device starts a writeback pass whatever it says,
// in bch_cached_dev_writeback_start. The check holds either way, since
// /dev/bcacheN reads the same data whether it comes from the cache or has
// been written back.)

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { ImageDir } from '../helpers/images.ts';
import { oracleFacts, oracleSkipReason, runOracle, ORACLE_SH_PRELUDE } from '../helpers/oracle.ts';
import { KERNEL_FIXTURES } from '../helpers/fixtures.ts';
import { fixtureImages, flushCli, kernelView } from '../cli/flush-helpers.ts';

const skip = oracleSkipReason();

test(
  'the kernel registers a backing device flushed by ubcache alone, clean, with its own view of the data',
  { skip, timeout: 600_000 },
  async () => {
    const dir = new ImageDir('ubcache-oracle-flush-');
    try {
      const names = ['wb-stopped', 'wb-crash'] as const;
      const disks: string[] = [];
      for (const name of names) {
        const original = fixtureImages(dir.dir, name);
        const flushed = fixtureImages(`${dir.dir}/${name}-flushed`, name);
        const r = flushCli([flushed.cache, flushed.bdev]);
        assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
        // vda/vdb: the kernel's originals, vdc: the flushed backing device (and vdd.. for the next fixture)
        disks.push(original.cache, original.bdev, flushed.bdev);
      }
      const letters = 'abcdefghijklmnop';
      const vd = (i: number): string => `vd${letters[i] ?? '?'}`;
      const script: string[] = [ORACLE_SH_PRELUDE];
      names.forEach((name, k) => {
        const [cache, bdev, flushed] = [vd(3 * k), vd(3 * k + 1), vd(3 * k + 2)];
        const set = KERNEL_FIXTURES[name].setUuid;
        script.push(
          // The flushed backing device alone.
          `echo /dev/${flushed} >/sys/fs/bcache/register`,
          `waitfor /sys/block/${flushed}/bcache || { dmesg | grep bcache; exit 1; }`,
          `echo "${k}.alone_state=$(cat /sys/block/${flushed}/bcache/state)"`,
          `echo "${k}.alone_holders=$(ls /sys/block/${flushed}/holders | wc -l)"`,
          `echo 1 >/sys/block/${flushed}/bcache/running`,
          `i=0; while [ -z "$(ls /sys/block/${flushed}/holders)" ]; do i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.05; done`,
          `dev=/dev/$(ls /sys/block/${flushed}/holders)`,
          `echo "${k}.alone_md5=$(md5sum <$dev | cut -d' ' -f1)"`,
          `echo 1 >/sys/block/${flushed}/bcache/stop`,
          `waitgone /sys/block/${flushed}/bcache`,
          // The kernel's own images, cache and all: its view of the device.
          // The backing device first, then the cache. writeback_running=0 is asked for, but the
          // attach of a dirty device starts writeback anyway; the read through /dev/bcacheN is the
          // same data either way.
          `echo /dev/${bdev} >/sys/fs/bcache/register`,
          `waitfor /sys/block/${bdev}/bcache/writeback_running || { dmesg | grep bcache; exit 1; }`,
          `echo 0 >/sys/block/${bdev}/bcache/writeback_running`,
          `echo /dev/${cache} >/sys/fs/bcache/register`,
          `waitfor /sys/block/${bdev}/bcache/cache || { dmesg | grep bcache; exit 1; }`,
          `echo 0 >/sys/block/${bdev}/bcache/writeback_running`,
          `echo "${k}.kernel_state=$(cat /sys/block/${bdev}/bcache/state)"`,
          `dev=/dev/$(ls /sys/block/${bdev}/holders)`,
          `echo "${k}.kernel_md5=$(md5sum <$dev | cut -d' ' -f1)"`,
          `echo 1 >/sys/block/${bdev}/bcache/stop`,
          `echo 1 >/sys/fs/bcache/${set}/stop`,
          `waitgone /sys/fs/bcache/${set}`,
        );
      });
      script.push(
        'echo "dmesg check:"',
        'dmesg | grep -i bcache | grep -i -E "error|\\bbad\\b|corrupt|inconsistent|missing" || true',
      );
      const r = await runOracle(script.join('\n') + '\n', disks);
      assert.equal(r.status, 0, `${r.output}\n${r.stderr}`);
      const facts = oracleFacts(r.output);
      names.forEach((name, k) => {
        const want = createHash('md5').update(kernelView(name)).digest('hex');
        assert.equal(
          facts.get(`${k}.alone_state`),
          'clean',
          `${name}: the flushed backing device says clean\n${r.output}`,
        );
        assert.equal(facts.get(`${k}.alone_holders`), '0', `${name}: not run without its cache until told to`);
        assert.equal(facts.get(`${k}.kernel_state`), 'dirty', `${name}: the original is dirty\n${r.output}`);
        assert.equal(facts.get(`${k}.kernel_md5`), want, `${name}: the kernel serves the view the fixture documents`);
        assert.equal(
          facts.get(`${k}.alone_md5`),
          want,
          `${name}: the flushed backing device alone reads the kernel's view`,
        );
      });
      assert.ok(!/error|\bbad\b|corrupt|inconsistent|missing/i.test(r.output.split('dmesg check:')[1] ?? ''), r.output);
    } finally {
      dir.remove();
    }
  },
);
