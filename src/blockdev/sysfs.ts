// What the kernel says about a block device, read from sysfs: its size, logical
// block size, whether it spins, and whether it can discard or zero ranges.
// Partitions have no queue/ directory of their own; their queue limits are the
// whole disk's, one directory up in the real (symlink-resolved) sysfs tree.

import { readFile, realpath, access } from 'node:fs/promises';
import { join } from 'node:path';

export interface BlockQueueInfo {
  /** Size in bytes (sysfs `size` is always in 512-byte sectors). */
  size: number;
  logicalBlockSize: number;
  rotational: boolean;
  /** Largest discard the device accepts; 0 means it cannot discard. */
  discardMaxBytes: number;
  /** Largest hardware write-zeroes; 0 means zeroing would fall back to writing zeroes. */
  writeZeroesMaxBytes: number;
}

/** Split a Linux dev_t (as from stat's bigint `rdev`/`dev`) into major and minor numbers (glibc's encoding). */
export function splitDevT(dev: bigint): { major: number; minor: number } {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return { major: Number(major), minor: Number(minor) };
}

async function readNumber(dir: string, name: string): Promise<number | undefined> {
  try {
    const text = (await readFile(join(dir, name), 'utf8')).trim();
    const n = Number(text);
    return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

/** The sysfs directory of a block device and of its request queue, or undefined if sysfs does not know it. */
async function sysfsDirs(dev: bigint): Promise<{ dir: string; queue: string } | undefined> {
  const { major, minor } = splitDevT(dev);
  let dir: string;
  try {
    // realpath first: '..' must be taken in the real tree, not lexically on the symlink.
    dir = await realpath(`/sys/dev/block/${major}:${minor}`);
  } catch {
    return undefined;
  }
  const isPartition = await access(join(dir, 'partition')).then(
    () => true,
    () => false,
  );
  return { dir, queue: isPartition ? join(dir, '..', 'queue') : join(dir, 'queue') };
}

/** Facts about the block device `rdev`; throws if sysfs has no size for it. */
export async function blockQueueInfo(rdev: bigint): Promise<BlockQueueInfo> {
  const dirs = await sysfsDirs(rdev);
  const sectors = dirs ? await readNumber(dirs.dir, 'size') : undefined;
  if (!dirs || sectors === undefined) {
    const { major, minor } = splitDevT(rdev);
    throw new Error(`no size for block device ${major}:${minor} in /sys/dev/block (is sysfs mounted?)`);
  }
  const lbs = await readNumber(dirs.queue, 'logical_block_size');
  return {
    size: sectors * 512,
    logicalBlockSize: lbs !== undefined && lbs >= 512 ? lbs : 512,
    rotational: (await readNumber(dirs.queue, 'rotational')) === 1,
    discardMaxBytes: (await readNumber(dirs.queue, 'discard_max_bytes')) ?? 0,
    writeZeroesMaxBytes: (await readNumber(dirs.queue, 'write_zeroes_max_bytes')) ?? 0,
  };
}

/**
 * Whether the disk holding a file spins (from the filesystem's st_dev). False
 * when the filesystem has no block device behind it (tmpfs, overlay, NFS).
 */
export async function filesystemRotational(dev: bigint): Promise<boolean> {
  const dirs = await sysfsDirs(dev);
  if (!dirs) return false;
  return (await readNumber(dirs.queue, 'rotational')) === 1;
}
