// Shared helpers for the engine tests: formatting a cache device the way
// make-bcache does, deterministic data, a key-builder, a leak check.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { BlockDevice } from '../../src/blockdev/types.ts';
import { SB_OFFSET } from '../../src/format/constants.ts';
import { encodeSuperblock, newCacheSuperblock, type Superblock } from '../../src/format/superblock.ts';
import { Worker } from '../../src/util/lifecycle.ts';

export interface FormatOptions {
  bucketSize?: number;
  blockSize?: number;
  setUuid?: Buffer;
  discard?: boolean;
  replacement?: number;
}

/** Write a fresh cache superblock (make-bcache -C): the first open initialises the set. */
export async function formatCache(dev: BlockDevice, o: FormatOptions = {}): Promise<Superblock> {
  const bucketSize = o.bucketSize ?? 128;
  const sb = newCacheSuperblock({
    uuid: randomBytes(16),
    setUuid: o.setUuid ?? randomBytes(16),
    blockSize: o.blockSize ?? 8,
    bucketSize,
    nbuckets: Math.floor(dev.size / 512 / bucketSize),
    discard: o.discard ?? false,
    replacement: o.replacement ?? 0,
  });
  await dev.write(encodeSuperblock(sb), SB_OFFSET);
  await dev.flush();
  return sb;
}

/** `sectors` sectors of data that depend on (seed, sector), so misplaced data is caught. */
export function sectorData(seed: number, firstSector: number, sectors: number): Buffer {
  const buf = Buffer.alloc(sectors * 512);
  for (let s = 0; s < sectors; s++) {
    const tag = `${seed}:${firstSector + s}|`;
    buf.write(tag.repeat(Math.ceil(512 / tag.length)).slice(0, 512), s * 512, 'latin1');
  }
  return buf;
}

/** Fail if any of our workers or timers outlived the test's objects. */
export function assertNothingLeft(): void {
  const workers = [...Worker.live()].map((w) => w.name);
  assert.deepEqual(workers, [], 'no worker alive');
  const timers = process.getActiveResourcesInfo().filter((r) => r === 'Timeout' || r === 'Immediate');
  assert.deepEqual(timers, [], 'no timer pending');
}
