// Reading a device's superblock from ctl itself, as bcache-tools' `bcache`
// does (it names devices by path and reads what they are from their
// superblock): for `show -d`, the Type column of `show`, and to find which
// registered device a path given on the command line is.

import { isBackingVersion, isCacheVersion, SB_OFFSET, SB_SIZE } from '../../format/constants.ts';
import { hasBcacheMagic, readSuperblockFields } from '../../format/superblock.ts';
import { formatUuid } from '../../format/uuid-text.ts';
import { closeDeviceAsync, openDeviceAsync, readAtAsync } from '../device-file.ts';

/** The 4 KiB at SB_OFFSET (shorter if the device is); throws a CliError if it cannot be opened. */
export async function readSuperblockBlock(path: string): Promise<Buffer> {
  const dev = await openDeviceAsync(path, { write: false });
  try {
    return await readAtAsync(dev, SB_SIZE, SB_OFFSET);
  } finally {
    await closeDeviceAsync(dev).catch(() => undefined);
  }
}

export interface SuperblockIdentity {
  version: number;
  /** bcache-tools' words: cache, data (a backing device) or unknown. */
  kind: 'cache' | 'data' | 'unknown';
  uuid: string;
  setUuid: string;
}

export function kindOf(version: number): SuperblockIdentity['kind'] {
  if (isCacheVersion(version)) return 'cache';
  if (isBackingVersion(version)) return 'data';
  return 'unknown';
}

/** What the superblock at `path` says the device is; undefined if it cannot be read or is no bcache device. */
export async function superblockIdentity(path: string): Promise<SuperblockIdentity | undefined> {
  let block: Buffer;
  try {
    block = await readSuperblockBlock(path);
  } catch {
    return undefined;
  }
  if (block.length < SB_SIZE || !hasBcacheMagic(block)) return undefined;
  const f = readSuperblockFields(block);
  const version = f.version <= 0xffffn ? Number(f.version) : -1;
  return { version, kind: kindOf(version), uuid: formatUuid(f.uuid), setUuid: formatUuid(f.setUuid) };
}
