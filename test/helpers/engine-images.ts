// Cache and backing superblocks for engine tests that run against real image
// files (the kernel oracle): what make-bcache -C / -B writes.

import { randomBytes } from 'node:crypto';
import { FileBlockDevice } from '../../src/blockdev/file.ts';
import { BDEV_STATE_CLEAN, BDEV_STATE_MASK, BDEV_STATE_SHIFT, SB_OFFSET } from '../../src/format/constants.ts';
import {
  encodeSuperblock,
  newBackingSuperblock,
  newCacheSuperblock,
  setFlagBits,
} from '../../src/format/superblock.ts';

export async function formatCacheImage(
  path: string,
  o: { setUuid: Buffer; bucketSize: number; blockSize: number },
): Promise<void> {
  const dev = await FileBlockDevice.open(path);
  try {
    const sb = newCacheSuperblock({
      uuid: randomBytes(16),
      setUuid: o.setUuid,
      blockSize: o.blockSize,
      bucketSize: o.bucketSize,
      nbuckets: Math.floor(dev.size / 512 / o.bucketSize),
      discard: false,
      replacement: 0,
    });
    await dev.write(encodeSuperblock(sb), SB_OFFSET);
    await dev.flush();
  } finally {
    await dev.close();
  }
}

/**
 * A backing superblock attached to `setUuid` in writeback mode, state clean.
 * With dirty data in the cache the state would be dirty, but then the
 * kernel's writeback starts copying it the moment the device attaches, before
 * a test can look at the untouched backing device; clean, it counts the dirty
 * keys and serves them, and writes them back once a write marks it dirty.
 */
export function encodeBackingSuperblock(o: {
  uuid: Buffer;
  setUuid: Buffer;
  blockSize: number;
  dataOffset: number;
}): Buffer {
  const sb = newBackingSuperblock({
    uuid: o.uuid,
    setUuid: o.setUuid,
    blockSize: o.blockSize,
    bucketSize: 1024,
    dataOffset: o.dataOffset,
    writeback: true,
  });
  sb.flags = setFlagBits(sb.flags, BDEV_STATE_SHIFT, BDEV_STATE_MASK, BDEV_STATE_CLEAN);
  const label = Buffer.alloc(32);
  label.write('ours');
  sb.label = label;
  return encodeSuperblock(sb);
}
