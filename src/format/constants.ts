// bcache's on-disk constants and the geometry the kernel derives from a
// superblock. Names follow the kernel (bcache_ondisk.h, bcache.h, super.c) so
// they can be grepped for; values are the kernel's, for x86-64 (4 KiB pages).

export const SECTOR_SIZE = 512;

/** The superblock lives at sector 8 (byte 4096) of every bcache device. */
export const SB_SECTOR = 8;
export const SB_OFFSET = SB_SECTOR * SECTOR_SIZE;
/** The kernel reads and rewrites the whole 4 KiB block the superblock sits in. */
export const SB_SIZE = 4096;
export const SB_LABEL_SIZE = 32;
export const SB_JOURNAL_BUCKETS = 256;
export const MAX_CACHES_PER_SET = 8;
/** Backing data starts at sector 16 (8 KiB) unless the superblock says otherwise. */
export const BDEV_DATA_START_DEFAULT = 16;

/** The kernel's page: metadata I/O sizes are multiples of it. */
export const PAGE_SIZE = 4096;
export const PAGE_SECTORS = PAGE_SIZE / SECTOR_SIZE;

/** At offset 24 of the superblock (absolute 0x1018): what identifies a bcache device. */
export const BCACHE_MAGIC: readonly number[] = [
  0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81,
];

/** A detached device's uuid slot is overwritten with this (super.c invalid_uuid). */
export const INVALID_UUID: readonly number[] = [
  0xa0, 0x3e, 0xf8, 0xed, 0x3e, 0xe1, 0xb8, 0x78, 0xc8, 0x50, 0xfc, 0x5e, 0xcb, 0x16, 0xcd, 0x99,
];

export const BCACHE_SB_VERSION_CDEV = 0;
export const BCACHE_SB_VERSION_BDEV = 1;
export const BCACHE_SB_VERSION_CDEV_WITH_UUID = 3;
export const BCACHE_SB_VERSION_BDEV_WITH_OFFSET = 4;
export const BCACHE_SB_VERSION_CDEV_WITH_FEATURES = 5;
export const BCACHE_SB_VERSION_BDEV_WITH_FEATURES = 6;
export const BCACHE_SB_MAX_VERSION = 6;

export function isBackingVersion(version: number): boolean {
  return (
    version === BCACHE_SB_VERSION_BDEV ||
    version === BCACHE_SB_VERSION_BDEV_WITH_OFFSET ||
    version === BCACHE_SB_VERSION_BDEV_WITH_FEATURES
  );
}

export function isCacheVersion(version: number): boolean {
  return (
    version === BCACHE_SB_VERSION_CDEV ||
    version === BCACHE_SB_VERSION_CDEV_WITH_UUID ||
    version === BCACHE_SB_VERSION_CDEV_WITH_FEATURES
  );
}

/** Feature bits (features.h), meaningful only in version 5/6 superblocks. */
export const BCH_FEATURE_INCOMPAT_OBSO_LARGE_BUCKET = 1n;
export const BCH_FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE = 2n;
/** Names as the kernel prints them; obso_large_bucket has no string in the kernel's table. */
export const INCOMPAT_FEATURE_NAMES: ReadonlyMap<bigint, string> = new Map([
  [BCH_FEATURE_INCOMPAT_OBSO_LARGE_BUCKET, 'obso_large_bucket'],
  [BCH_FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE, 'large_bucket'],
]);
export const BCH_FEATURE_COMPAT_SUPP = 0n;
export const BCH_FEATURE_RO_COMPAT_SUPP = 0n;
export const BCH_FEATURE_INCOMPAT_SUPP =
  BCH_FEATURE_INCOMPAT_OBSO_LARGE_BUCKET | BCH_FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE;

/** Cache superblock flags. */
export const CACHE_SYNC_BIT = 0n;
export const CACHE_DISCARD_BIT = 1n;
export const CACHE_REPLACEMENT_SHIFT = 2n;
export const CACHE_REPLACEMENT_MASK = 7n;
export const CACHE_REPLACEMENT_NAMES: readonly string[] = ['lru', 'fifo', 'random'];

/** Backing superblock flags. */
export const BDEV_CACHE_MODE_MASK = 15n;
/** The cache modes (CACHE_MODE_* of bcache_ondisk.h), the low bits of a backing superblock's flags. */
export const CACHE_MODE_WRITETHROUGH = 0;
export const CACHE_MODE_WRITEBACK = 1;
export const CACHE_MODE_WRITEAROUND = 2;
export const CACHE_MODE_NONE = 3;
export const CACHE_MODE_NAMES: readonly string[] = ['writethrough', 'writeback', 'writearound', 'none'];
export const BDEV_STATE_SHIFT = 61n;
export const BDEV_STATE_MASK = 3n;
export const BDEV_STATE_NONE = 0;
export const BDEV_STATE_CLEAN = 1;
export const BDEV_STATE_DIRTY = 2;
export const BDEV_STATE_STALE = 3;
/** The backing device's `state` attribute, by BDEV_STATE. */
export const BDEV_STATE_NAMES: readonly string[] = ['no cache', 'clean', 'dirty', 'inconsistent'];

/** Other structures' magics are these XORed with the set's magic (first 8 bytes of the set uuid, LE). */
export const JSET_MAGIC = 0x245235c1a3625032n;
export const PSET_MAGIC = 0x6750e15f87337f91n;
export const BSET_MAGIC = 0x90135c78b99e07f5n;

export const BCACHE_JSET_VERSION_UUIDV1 = 1;
export const BCACHE_JSET_VERSION = 1;
/** Version 1 bsets are checksummed with the node's pointer as seed; version 0 with plain bch_crc64. */
export const BCACHE_BSET_CSUM = 1;
export const BCACHE_BSET_VERSION = 1;

/** A journal entry is at most 8 pages (JSET_BITS = 3). */
export const JSET_BITS = 3;
export const JSET_MAX_BYTES = PAGE_SIZE << JSET_BITS;

/** Btree nodes are capped at 256 KiB (super.c BTREE_MAX_PAGES). */
export const BTREE_MAX_PAGES = (256 * 1024) / PAGE_SIZE;

/** Metadata buckets (prio, uuid, btree) use at most this many pages (MAX_ORDER_NR_PAGES on 6.1 x86-64). */
export const MAX_META_BUCKET_PAGES = 1024;

/** Priorities (alloc.c): a fresh bucket, and a btree/prio bucket. */
export const INITIAL_PRIO = 32768;
export const BTREE_PRIO = 0xffff;

/**
 * The kernel refuses a cache whose roundup_pow_of_two(nbuckets) >> 10 is 0
 * (cache_alloc, "cache device is too small"): 512 buckets fail, 513 work.
 * read_super's own floor is 128.
 */
export const MIN_CACHE_BUCKETS = 513;
export const MIN_SB_BUCKETS = 128;

/** meta_bucket_pages(): pages of a bucket used for prios, uuids and btree nodes. */
export function metaBucketPages(bucketSize: number): number {
  return Math.min(Math.floor(bucketSize / PAGE_SECTORS), MAX_META_BUCKET_PAGES);
}

export function metaBucketBytes(bucketSize: number): number {
  return metaBucketPages(bucketSize) * PAGE_SIZE;
}

/** Bytes before the first entry of a prio bucket (struct prio_set). */
export const PRIO_SET_HEADER_BYTES = 40;
/** bucket_disk: prio u16 + gen u8, packed. */
export const PRIO_ENTRY_BYTES = 3;

/** prios_per_bucket(): entries in one prio bucket. */
export function priosPerBucket(bucketSize: number): number {
  return Math.floor((metaBucketBytes(bucketSize) - PRIO_SET_HEADER_BYTES) / PRIO_ENTRY_BYTES);
}

/** prio_buckets(): how many buckets the prio/gen list takes. */
export function prioBucketCount(nbuckets: number, bucketSize: number): number {
  return Math.ceil(nbuckets / priosPerBucket(bucketSize));
}

/** A freshly initialised set gets clamp(nbuckets >> 7, 2, 256) journal buckets (run_cache_set). */
export function journalBucketCount(nbuckets: number): number {
  return Math.min(Math.max(Math.floor(nbuckets / 128), 2), SB_JOURNAL_BUCKETS);
}

/** c->btree_pages: node size in pages (bch_cache_set_alloc). */
export function btreePages(bucketSize: number): number {
  const pages = metaBucketPages(bucketSize);
  return pages > BTREE_MAX_PAGES ? Math.max(Math.floor(pages / 4), BTREE_MAX_PAGES) : pages;
}

/** KEY_SIZE of a btree node pointer: the node's size in sectors. */
export function btreeNodeSectors(bucketSize: number): number {
  return btreePages(bucketSize) * PAGE_SECTORS;
}

export const UUID_ENTRY_BYTES = 128;
/** struct uuid_entry_v0: uuid[16], label[32], first_reg, last_reg, invalidated, pad (64 bytes, not 48). */
export const UUID_ENTRY_V0_BYTES = 64;

/** c->nr_uuids: uuid slots in the uuid bucket (= the most devices a set can hold). */
export function uuidSlotCount(bucketSize: number): number {
  return metaBucketBytes(bucketSize) / UUID_ENTRY_BYTES;
}

/** first_bucket as make-bcache computes it: the first bucket past the superblock. */
export function defaultFirstBucket(bucketSize: number): number {
  return Math.floor(23 / bucketSize) + 1;
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}
