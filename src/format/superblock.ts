// struct cache_sb_disk: the superblock at byte 4096 of every bcache device.
//
// Three views of the same 4 KiB block:
//  * readSuperblockFields(): every field exactly as stored, no checks (u64s as
//    bigint). What show-super prints, even for a superblock the kernel refuses.
//  * decodeSuperblock(): the checks of the kernel's read_super() and
//    read_super_common(), then a Superblock with friendly numbers. Versions
//    0, 1, 3, 4 and, with their feature fields, 5 and 6.
//  * encodeSuperblock(): back to the 4 KiB block. A decoded superblock keeps
//    the block it came from (`raw`) and encoding writes the fields over a copy
//    of it, as the kernel's __write_super() does, so bytes we do not know
//    survive a rewrite.
//
// Layout (byte offsets inside the block): csum 0, offset 8, version 16, magic
// 24, uuid 40, set_uuid 56 (its first 8 bytes LE are the set's "magic"),
// label 72, flags 104, seq 112, feature_compat 120, feature_incompat 128,
// feature_ro_compat 136, pad 144, nbuckets | data_offset 184, block_size 192,
// bucket_size 194, nr_in_set 196, nr_this_dev 198, last_mount 200,
// first_bucket 204, keys (njournal_buckets) 206, d[256] 208, then
// obso_bucket_size_hi 2256. The checksum covers [8, 208 + 8 * keys).

import { bchCrc64 } from './crc64.ts';
import {
  BCACHE_MAGIC,
  BCACHE_SB_VERSION_BDEV,
  BCACHE_SB_VERSION_BDEV_WITH_FEATURES,
  BCACHE_SB_VERSION_BDEV_WITH_OFFSET,
  BCACHE_SB_VERSION_CDEV,
  BCACHE_SB_VERSION_CDEV_WITH_FEATURES,
  BCACHE_SB_VERSION_CDEV_WITH_UUID,
  BCH_FEATURE_COMPAT_SUPP,
  BCH_FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE,
  BCH_FEATURE_INCOMPAT_OBSO_LARGE_BUCKET,
  BCH_FEATURE_INCOMPAT_SUPP,
  BCH_FEATURE_RO_COMPAT_SUPP,
  BDEV_CACHE_MODE_MASK,
  BDEV_DATA_START_DEFAULT,
  BDEV_STATE_MASK,
  BDEV_STATE_SHIFT,
  CACHE_DISCARD_BIT,
  CACHE_REPLACEMENT_MASK,
  CACHE_REPLACEMENT_SHIFT,
  CACHE_SYNC_BIT,
  defaultFirstBucket,
  INCOMPAT_FEATURE_NAMES,
  isBackingVersion,
  isPowerOfTwo,
  MAX_CACHES_PER_SET,
  MIN_SB_BUCKETS,
  PAGE_SECTORS,
  SB_JOURNAL_BUCKETS,
  SB_LABEL_SIZE,
  SB_SECTOR,
  SB_SIZE,
  SECTOR_SIZE,
} from './constants.ts';
import { FormatError, hex } from './errors.ts';
import { isZeroUuid } from './uuid-text.ts';

const S = 'cache_sb';

/** Byte offsets of the fields inside the superblock block. */
export const SB_FIELD = {
  csum: 0,
  offset: 8,
  version: 16,
  magic: 24,
  uuid: 40,
  setUuid: 56,
  label: 72,
  flags: 104,
  seq: 112,
  featureCompat: 120,
  featureIncompat: 128,
  featureRoCompat: 136,
  nbuckets: 184,
  dataOffset: 184,
  blockSize: 192,
  bucketSize: 194,
  nrInSet: 196,
  nrThisDev: 198,
  lastMount: 200,
  firstBucket: 204,
  keys: 206,
  d: 208,
  obsoBucketSizeHi: 2256,
} as const;

/** Every field as stored, unchecked. */
export interface SuperblockFields {
  csum: bigint;
  offset: bigint;
  version: bigint;
  magic: Buffer;
  uuid: Buffer;
  setUuid: Buffer;
  label: Buffer;
  flags: bigint;
  seq: bigint;
  featureCompat: bigint;
  featureIncompat: bigint;
  featureRoCompat: bigint;
  /** The u64 at 184: nbuckets on a cache device, data_offset on a version 4/6 backing device. */
  nbuckets: bigint;
  blockSize: number;
  /** The raw u16 (for large_bucket superblocks, a log2). */
  bucketSize: number;
  nrInSet: number;
  nrThisDev: number;
  lastMount: number;
  firstBucket: number;
  keys: number;
  d: bigint[];
  obsoBucketSizeHi: number;
}

function copy(block: Uint8Array, start: number, len: number): Buffer {
  return Buffer.from(block.subarray(start, start + len));
}

function asBuffer(block: Uint8Array): Buffer {
  return Buffer.isBuffer(block) ? block : Buffer.from(block.buffer, block.byteOffset, block.byteLength);
}

/** Read the fields of a superblock block (at least 2258 bytes; normally the 4 KiB block at byte 4096). */
export function readSuperblockFields(block: Uint8Array): SuperblockFields {
  if (block.length < SB_FIELD.obsoBucketSizeHi + 2) {
    throw new FormatError(S, 'size', `${block.length} bytes is too short for a superblock (${SB_SIZE} expected)`);
  }
  const b = asBuffer(block);
  const d: bigint[] = [];
  for (let i = 0; i < SB_JOURNAL_BUCKETS; i++) d.push(b.readBigUInt64LE(SB_FIELD.d + 8 * i));
  return {
    csum: b.readBigUInt64LE(SB_FIELD.csum),
    offset: b.readBigUInt64LE(SB_FIELD.offset),
    version: b.readBigUInt64LE(SB_FIELD.version),
    magic: copy(b, SB_FIELD.magic, 16),
    uuid: copy(b, SB_FIELD.uuid, 16),
    setUuid: copy(b, SB_FIELD.setUuid, 16),
    label: copy(b, SB_FIELD.label, SB_LABEL_SIZE),
    flags: b.readBigUInt64LE(SB_FIELD.flags),
    seq: b.readBigUInt64LE(SB_FIELD.seq),
    featureCompat: b.readBigUInt64LE(SB_FIELD.featureCompat),
    featureIncompat: b.readBigUInt64LE(SB_FIELD.featureIncompat),
    featureRoCompat: b.readBigUInt64LE(SB_FIELD.featureRoCompat),
    nbuckets: b.readBigUInt64LE(SB_FIELD.nbuckets),
    blockSize: b.readUInt16LE(SB_FIELD.blockSize),
    bucketSize: b.readUInt16LE(SB_FIELD.bucketSize),
    nrInSet: b.readUInt16LE(SB_FIELD.nrInSet),
    nrThisDev: b.readUInt16LE(SB_FIELD.nrThisDev),
    lastMount: b.readUInt32LE(SB_FIELD.lastMount),
    firstBucket: b.readUInt16LE(SB_FIELD.firstBucket),
    keys: b.readUInt16LE(SB_FIELD.keys),
    d,
    obsoBucketSizeHi: b.readUInt16LE(SB_FIELD.obsoBucketSizeHi),
  };
}

/**
 * csum_set() of a superblock block: CRC-64 of [8, 208 + 8 * keys). A `keys`
 * too large for the block (more than 486) is clamped to the block's end.
 */
export function superblockCsum(block: Uint8Array, keys: number): bigint {
  const end = Math.min(SB_FIELD.d + 8 * keys, block.length);
  return bchCrc64(block, SB_FIELD.offset, end);
}

export function hasBcacheMagic(block: Uint8Array, at = SB_FIELD.magic): boolean {
  if (block.length < at + 16) return false;
  for (let i = 0; i < 16; i++) if (block[at + i] !== BCACHE_MAGIC[i]) return false;
  return true;
}

/** A checked superblock. */
export interface Superblock {
  version: number;
  uuid: Buffer;
  setUuid: Buffer;
  /** 32 bytes, not necessarily NUL-terminated. */
  label: Buffer;
  flags: bigint;
  seq: bigint;
  lastMount: number;
  featureCompat: bigint;
  featureIncompat: bigint;
  featureRoCompat: bigint;
  /** Sectors. Backing devices have one too: the set's block size must not exceed it. */
  blockSize: number;
  /** Sectors, with the large-bucket features applied. make-bcache writes one for backing devices too. */
  bucketSize: number;
  nrInSet: number;
  nrThisDev: number;
  firstBucket: number;
  /** d[0, keys): the journal buckets (cache devices; empty until the kernel first registers the cache). */
  journalBuckets: number[];
  /** Cache devices: buckets on the device. 0 on backing devices. */
  nbuckets: number;
  /** Backing devices: first data sector (16 for version 1). 0 on cache devices. */
  dataOffset: number;
  /** The 4 KiB block this was decoded from; encoding writes over a copy of it. */
  raw?: Buffer;
}

export function isBacking(sb: Pick<Superblock, 'version'>): boolean {
  return isBackingVersion(sb.version);
}

function flagBits(flags: bigint, shift: bigint, mask: bigint): number {
  return Number((flags >> shift) & mask);
}

/** `flags` with the bit field (shift, mask) set to value. */
export function setFlagBits(flags: bigint, shift: bigint, mask: bigint, value: number): bigint {
  return (flags & ~(mask << shift)) | ((BigInt(value) & mask) << shift);
}

export function cacheSync(sb: Pick<Superblock, 'flags'>): boolean {
  return flagBits(sb.flags, CACHE_SYNC_BIT, 1n) === 1;
}
export function cacheDiscard(sb: Pick<Superblock, 'flags'>): boolean {
  return flagBits(sb.flags, CACHE_DISCARD_BIT, 1n) === 1;
}
/** CACHE_REPLACEMENT: 0 lru, 1 fifo, 2 random. */
export function cacheReplacement(sb: Pick<Superblock, 'flags'>): number {
  return flagBits(sb.flags, CACHE_REPLACEMENT_SHIFT, CACHE_REPLACEMENT_MASK);
}
/** BDEV_CACHE_MODE: 0 writethrough, 1 writeback, 2 writearound, 3 none. */
export function bdevCacheMode(sb: Pick<Superblock, 'flags'>): number {
  return flagBits(sb.flags, 0n, BDEV_CACHE_MODE_MASK);
}
/** BDEV_STATE: 0 none (detached), 1 clean, 2 dirty, 3 stale. */
export function bdevState(sb: Pick<Superblock, 'flags'>): number {
  return flagBits(sb.flags, BDEV_STATE_SHIFT, BDEV_STATE_MASK);
}

/** The set's magic: the first 8 bytes of the set uuid as a little-endian u64. */
export function setMagic(sb: Pick<Superblock, 'setUuid'>): bigint {
  return sb.setUuid.readBigUInt64LE(0);
}

/** Set bit numbers of `mask`, for messages. */
function bitList(mask: bigint): number[] {
  const bits: number[] = [];
  for (let i = 0; i < 64; i++) if ((mask >> BigInt(i)) & 1n) bits.push(i);
  return bits;
}

function unknownFeatures(
  kind: string,
  field: string,
  value: bigint,
  supported: bigint,
  known: ReadonlyMap<bigint, string> = new Map(),
): FormatError | undefined {
  const unknown = value & ~supported;
  if (unknown === 0n) return undefined;
  const names = bitList(unknown).map((bit) => known.get(1n << BigInt(bit)) ?? `bit ${bit}`);
  return new FormatError(
    S,
    field,
    `unknown ${kind} feature${names.length > 1 ? 's' : ''} ${names.join(', ')} (the kernel refuses it too: "Unsupported ${kind} feature found")`,
  );
}

/** bucket_size as the kernel reads it (get_bucket_size): features can widen it. */
function effectiveBucketSize(f: SuperblockFields, version: number): number {
  if (version < BCACHE_SB_VERSION_CDEV_WITH_FEATURES) return f.bucketSize;
  if (f.featureIncompat & BCH_FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE) {
    if (f.bucketSize > 31) {
      throw new FormatError(S, 'bucket_size', `large_bucket order ${f.bucketSize} overflows (at most 31)`);
    }
    return 2 ** f.bucketSize;
  }
  if (f.featureIncompat & BCH_FEATURE_INCOMPAT_OBSO_LARGE_BUCKET) {
    return f.bucketSize + f.obsoBucketSizeHi * 65536;
  }
  return f.bucketSize;
}

export interface DecodeSuperblockOptions {
  /** Device size in sectors: a cache's buckets must fit ("Invalid superblock: device too small"). */
  deviceSectors?: number;
  /** Device logical block size in bytes: the superblock's block size must not be smaller. */
  logicalBlockSize?: number;
}

/**
 * Decode and check a superblock block as the kernel's read_super() does, in
 * the same order, so the first problem reported is the one the kernel would
 * report. Throws FormatError naming the field.
 */
export function decodeSuperblock(block: Uint8Array, options: DecodeSuperblockOptions = {}): Superblock {
  const f = readSuperblockFields(block);
  if (f.offset !== BigInt(SB_SECTOR)) {
    throw new FormatError(S, 'offset', `is ${f.offset}, not ${SB_SECTOR}: not a bcache superblock`);
  }
  if (!hasBcacheMagic(block)) {
    throw new FormatError(S, 'magic', 'bad magic: not a bcache superblock');
  }
  const expected = superblockCsum(block, f.keys);
  if (f.csum !== expected) {
    throw new FormatError(S, 'csum', `stored ${hex(f.csum)} but the superblock checksums to ${hex(expected)}: corrupt`);
  }
  if (isZeroUuid(f.uuid)) throw new FormatError(S, 'uuid', 'is all zeroes (the kernel: "Bad UUID")');
  if (options.logicalBlockSize !== undefined && f.blockSize * SECTOR_SIZE < options.logicalBlockSize) {
    throw new FormatError(
      S,
      'block_size',
      `${f.blockSize * SECTOR_SIZE} bytes is smaller than the device's logical block size ${options.logicalBlockSize}`,
    );
  }
  if (f.version > 0xffffffffn) throw new FormatError(S, 'version', `${f.version} is not a superblock version`);
  const version = Number(f.version);
  const sb: Superblock = {
    version,
    uuid: f.uuid,
    setUuid: f.setUuid,
    label: f.label,
    flags: f.flags,
    seq: f.seq,
    lastMount: f.lastMount,
    featureCompat: 0n,
    featureIncompat: 0n,
    featureRoCompat: 0n,
    blockSize: f.blockSize,
    bucketSize: f.bucketSize,
    nrInSet: f.nrInSet,
    nrThisDev: f.nrThisDev,
    firstBucket: f.firstBucket,
    journalBuckets: [],
    nbuckets: 0,
    dataOffset: 0,
    raw: Buffer.from(block.subarray(0, Math.min(block.length, SB_SIZE))),
  };
  if (version >= BCACHE_SB_VERSION_CDEV_WITH_FEATURES && version <= BCACHE_SB_VERSION_BDEV_WITH_FEATURES) {
    sb.featureCompat = f.featureCompat;
    sb.featureIncompat = f.featureIncompat;
    sb.featureRoCompat = f.featureRoCompat;
    const err =
      unknownFeatures('compatible', 'feature_compat', f.featureCompat, BCH_FEATURE_COMPAT_SUPP) ??
      unknownFeatures('read-only compatible', 'feature_ro_compat', f.featureRoCompat, BCH_FEATURE_RO_COMPAT_SUPP) ??
      unknownFeatures(
        'incompatible',
        'feature_incompat',
        f.featureIncompat,
        BCH_FEATURE_INCOMPAT_SUPP,
        INCOMPAT_FEATURE_NAMES,
      );
    if (err) throw err;
  }
  switch (version) {
    case BCACHE_SB_VERSION_BDEV:
      sb.dataOffset = BDEV_DATA_START_DEFAULT;
      return sb;
    case BCACHE_SB_VERSION_BDEV_WITH_OFFSET:
    case BCACHE_SB_VERSION_BDEV_WITH_FEATURES:
      if (f.nbuckets < BigInt(BDEV_DATA_START_DEFAULT) || f.nbuckets > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new FormatError(
          S,
          'data_offset',
          `${f.nbuckets} sectors is not a usable data offset (at least ${BDEV_DATA_START_DEFAULT})`,
        );
      }
      sb.dataOffset = Number(f.nbuckets);
      return sb;
    case BCACHE_SB_VERSION_CDEV:
    case BCACHE_SB_VERSION_CDEV_WITH_UUID:
    case BCACHE_SB_VERSION_CDEV_WITH_FEATURES:
      sb.bucketSize = effectiveBucketSize(f, version);
      checkCacheGeometry(sb, f, options);
      return sb;
    default:
      throw new FormatError(S, 'version', `${version} is not a superblock version bcache supports (0, 1, 3, 4, 5, 6)`);
  }
}

/** read_super_common(): the cache device checks. */
function checkCacheGeometry(sb: Superblock, f: SuperblockFields, options: DecodeSuperblockOptions): void {
  if (f.keys > SB_JOURNAL_BUCKETS) {
    throw new FormatError(S, 'keys', `${f.keys} journal buckets is more than ${SB_JOURNAL_BUCKETS}`);
  }
  if (f.nbuckets > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(S, 'nbuckets', `${f.nbuckets} is too many`);
  const nbuckets = Number(f.nbuckets);
  if (nbuckets < MIN_SB_BUCKETS) {
    throw new FormatError(S, 'nbuckets', `${nbuckets} buckets is fewer than the ${MIN_SB_BUCKETS} bcache needs`);
  }
  if (!isPowerOfTwo(sb.blockSize)) {
    throw new FormatError(S, 'block_size', `${sb.blockSize} sectors is not a power of two`);
  }
  if (sb.blockSize > PAGE_SECTORS) {
    throw new FormatError(S, 'block_size', `${sb.blockSize} sectors is larger than a page (${PAGE_SECTORS})`);
  }
  if (!isPowerOfTwo(sb.bucketSize)) {
    throw new FormatError(S, 'bucket_size', `${sb.bucketSize} sectors is not a power of two`);
  }
  if (sb.bucketSize < PAGE_SECTORS) {
    throw new FormatError(S, 'bucket_size', `${sb.bucketSize} sectors is smaller than a page (${PAGE_SECTORS})`);
  }
  if (options.deviceSectors !== undefined && options.deviceSectors < sb.bucketSize * nbuckets) {
    throw new FormatError(
      S,
      'nbuckets',
      `${nbuckets} buckets of ${sb.bucketSize} sectors need ${sb.bucketSize * nbuckets} sectors but the device has ${options.deviceSectors}: device too small`,
    );
  }
  if (isZeroUuid(sb.setUuid)) throw new FormatError(S, 'set_uuid', 'is all zeroes (the kernel: "Bad UUID")');
  if (sb.nrInSet === 0 || sb.nrInSet <= sb.nrThisDev || sb.nrInSet > MAX_CACHES_PER_SET) {
    throw new FormatError(
      S,
      'nr_in_set',
      `device ${sb.nrThisDev} of ${sb.nrInSet}: not a valid cache device number in a set of at most ${MAX_CACHES_PER_SET}`,
    );
  }
  const journal: number[] = [];
  for (let i = 0; i < f.keys; i++) {
    const di = f.d[i] ?? 0n;
    if (di !== BigInt(sb.firstBucket + i)) {
      throw new FormatError(
        S,
        'd',
        `journal bucket ${i} is ${di}, not ${sb.firstBucket + i}: journal buckets not sequential`,
      );
    }
    journal.push(Number(di));
  }
  if (sb.firstBucket + f.keys > nbuckets) {
    throw new FormatError(
      S,
      'keys',
      `${f.keys} journal buckets from bucket ${sb.firstBucket} run past ${nbuckets} buckets`,
    );
  }
  if (sb.firstBucket * sb.bucketSize < 16) {
    throw new FormatError(S, 'first_bucket', `bucket ${sb.firstBucket} starts before the end of the superblock`);
  }
  sb.nbuckets = nbuckets;
  sb.journalBuckets = journal;
}

/**
 * The 4 KiB superblock block for `sb`: its fields written over a copy of
 * sb.raw (or zeroes), the checksum last.
 */
export function encodeSuperblock(sb: Superblock): Buffer {
  const b = Buffer.alloc(SB_SIZE);
  if (sb.raw) sb.raw.copy(b, 0, 0, Math.min(sb.raw.length, SB_SIZE));
  const keys = sb.journalBuckets.length;
  if (keys > SB_JOURNAL_BUCKETS) throw new FormatError(S, 'keys', `${keys} journal buckets is more than 256`);
  const check = (field: string, v: number, max: number): number => {
    if (!Number.isInteger(v) || v < 0 || v > max) throw new FormatError(S, field, `${v} does not fit the field`);
    return v;
  };
  if (sb.uuid.length !== 16 || sb.setUuid.length !== 16) throw new FormatError(S, 'uuid', 'uuids are 16 bytes');
  if (sb.label.length > SB_LABEL_SIZE) throw new FormatError(S, 'label', `longer than ${SB_LABEL_SIZE} bytes`);
  b.writeBigUInt64LE(BigInt(SB_SECTOR), SB_FIELD.offset);
  b.writeBigUInt64LE(BigInt(check('version', sb.version, 0xffffffff)), SB_FIELD.version);
  Buffer.from(BCACHE_MAGIC).copy(b, SB_FIELD.magic);
  sb.uuid.copy(b, SB_FIELD.uuid);
  sb.setUuid.copy(b, SB_FIELD.setUuid);
  b.fill(0, SB_FIELD.label, SB_FIELD.label + SB_LABEL_SIZE);
  sb.label.copy(b, SB_FIELD.label);
  b.writeBigUInt64LE(BigInt.asUintN(64, sb.flags), SB_FIELD.flags);
  b.writeBigUInt64LE(BigInt.asUintN(64, sb.seq), SB_FIELD.seq);
  if (sb.version >= BCACHE_SB_VERSION_CDEV_WITH_FEATURES) {
    b.writeBigUInt64LE(BigInt.asUintN(64, sb.featureCompat), SB_FIELD.featureCompat);
    b.writeBigUInt64LE(BigInt.asUintN(64, sb.featureIncompat), SB_FIELD.featureIncompat);
    b.writeBigUInt64LE(BigInt.asUintN(64, sb.featureRoCompat), SB_FIELD.featureRoCompat);
  }
  if (isBackingVersion(sb.version)) {
    if (sb.version !== BCACHE_SB_VERSION_BDEV) {
      b.writeBigUInt64LE(BigInt(check('data_offset', sb.dataOffset, Number.MAX_SAFE_INTEGER)), SB_FIELD.dataOffset);
    }
  } else {
    b.writeBigUInt64LE(BigInt(check('nbuckets', sb.nbuckets, Number.MAX_SAFE_INTEGER)), SB_FIELD.nbuckets);
  }
  b.writeUInt16LE(check('block_size', sb.blockSize, 0xffff), SB_FIELD.blockSize);
  writeBucketSize(sb, b);
  b.writeUInt16LE(check('nr_in_set', sb.nrInSet, 0xffff), SB_FIELD.nrInSet);
  b.writeUInt16LE(check('nr_this_dev', sb.nrThisDev, 0xffff), SB_FIELD.nrThisDev);
  b.writeUInt32LE(check('last_mount', sb.lastMount, 0xffffffff), SB_FIELD.lastMount);
  b.writeUInt16LE(check('first_bucket', sb.firstBucket, 0xffff), SB_FIELD.firstBucket);
  b.writeUInt16LE(keys, SB_FIELD.keys);
  for (let i = 0; i < keys; i++) {
    b.writeBigUInt64LE(BigInt(check('d', sb.journalBuckets[i] ?? -1, Number.MAX_SAFE_INTEGER)), SB_FIELD.d + 8 * i);
  }
  b.writeBigUInt64LE(superblockCsum(b, keys), SB_FIELD.csum);
  return b;
}

function writeBucketSize(sb: Superblock, b: Buffer): void {
  // Only a cache's bucket size is widened by the features (get_bucket_size reads it for caches only).
  const features = sb.version === BCACHE_SB_VERSION_CDEV_WITH_FEATURES ? sb.featureIncompat : 0n;
  if (features & BCH_FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE) {
    if (!isPowerOfTwo(sb.bucketSize)) {
      throw new FormatError(S, 'bucket_size', `${sb.bucketSize} is not a power of two (large_bucket stores a log2)`);
    }
    b.writeUInt16LE(Math.log2(sb.bucketSize), SB_FIELD.bucketSize);
  } else if (features & BCH_FEATURE_INCOMPAT_OBSO_LARGE_BUCKET) {
    b.writeUInt16LE(sb.bucketSize % 65536, SB_FIELD.bucketSize);
    b.writeUInt16LE(Math.floor(sb.bucketSize / 65536) & 0xffff, SB_FIELD.obsoBucketSizeHi);
  } else {
    if (!Number.isInteger(sb.bucketSize) || sb.bucketSize < 0 || sb.bucketSize > 0xffff) {
      throw new FormatError(S, 'bucket_size', `${sb.bucketSize} sectors does not fit 16 bits`);
    }
    b.writeUInt16LE(sb.bucketSize, SB_FIELD.bucketSize);
  }
}

export interface NewCacheOptions {
  uuid: Buffer;
  setUuid: Buffer;
  blockSize: number;
  bucketSize: number;
  nbuckets: number;
  discard: boolean;
  /** 0 lru, 1 fifo, 2 random. */
  replacement: number;
}

/** A cache superblock as make-bcache writes it: version 0, one device in the set, no journal yet. */
export function newCacheSuperblock(o: NewCacheOptions): Superblock {
  let flags = setFlagBits(0n, CACHE_DISCARD_BIT, 1n, o.discard ? 1 : 0);
  flags = setFlagBits(flags, CACHE_REPLACEMENT_SHIFT, CACHE_REPLACEMENT_MASK, o.replacement);
  return {
    version: BCACHE_SB_VERSION_CDEV,
    uuid: o.uuid,
    setUuid: o.setUuid,
    label: Buffer.alloc(SB_LABEL_SIZE),
    flags,
    seq: 0n,
    lastMount: 0,
    featureCompat: 0n,
    featureIncompat: 0n,
    featureRoCompat: 0n,
    blockSize: o.blockSize,
    bucketSize: o.bucketSize,
    nrInSet: 1,
    nrThisDev: 0,
    firstBucket: defaultFirstBucket(o.bucketSize),
    journalBuckets: [],
    nbuckets: o.nbuckets,
    dataOffset: 0,
  };
}

export interface NewBackingOptions {
  uuid: Buffer;
  setUuid: Buffer;
  blockSize: number;
  bucketSize: number;
  /** Sectors; 16 gives a version 1 superblock, anything else version 4. */
  dataOffset: number;
  writeback: boolean;
}

/** A backing superblock as make-bcache writes it: detached, writethrough or writeback. */
export function newBackingSuperblock(o: NewBackingOptions): Superblock {
  return {
    version: o.dataOffset === BDEV_DATA_START_DEFAULT ? BCACHE_SB_VERSION_BDEV : BCACHE_SB_VERSION_BDEV_WITH_OFFSET,
    uuid: o.uuid,
    setUuid: o.setUuid,
    label: Buffer.alloc(SB_LABEL_SIZE),
    flags: o.writeback ? 1n : 0n,
    seq: 0n,
    lastMount: 0,
    featureCompat: 0n,
    featureIncompat: 0n,
    featureRoCompat: 0n,
    blockSize: o.blockSize,
    bucketSize: o.bucketSize,
    nrInSet: 0,
    nrThisDev: 0,
    firstBucket: 0,
    journalBuckets: [],
    nbuckets: 0,
    dataOffset: o.dataOffset,
  };
}
