// Admission of read misses into the cache: ubcache's extension against cache
// pollution (off by default; docs/design.md, "Admission").
//
// bcache fills every read miss that check_should_bypass lets through, so one
// pass over cold data larger than the cache (a backup, a scrub, a scan)
// pushes the whole hot set out. With `cache_admission` set to `second-hit`,
// a miss is filled only if part of what it reads was missed before, recently:
// data read once never enters the cache, data read twice does (on its second
// read; from the third on it hits).
//
// "Recently" is a ghost table of the chunks (64 KiB of the backing device)
// missed lately, each with a 16-bit mask of which of its 4 KiB blocks were
// missed. The table is direct-mapped (a chunk has one slot, found by a hash;
// a newer chunk in the same slot replaces the older), and has four slots per
// 64 KiB chunk of the cache, rounded up to a power of two (at most 2M slots,
// 20 MiB): a block read again before a few cache's worth of other chunks were
// missed is admitted. A window of one cache's worth, what an LRU cache of that
// size would have kept anyway, proved too short in the benchmark: a scan's
// misses push the hot set's first sightings out before their second. The
// blocks within a chunk are told apart so that a scan reading a chunk block
// by block (sequentially, under the cutoff) does not admit it from its own
// second block.
//
// Nothing here is on disk: the table starts empty after every start, and the
// on-disk format is bcache's whatever the policy. Hits never look at the
// table; only a miss that would be filled does (two array reads and writes
// per chunk it covers, no allocation).

import { SECTOR_SIZE } from '../format/constants.ts';

/** The policies `cache_admission` accepts, in the order sysfs lists them. */
export const ADMISSION_POLICIES = ['always', 'second-hit'] as const;
export type AdmissionPolicy = (typeof ADMISSION_POLICIES)[number];

/** Sectors in a chunk of the ghost table (64 KiB). */
export const CHUNK_SECTORS = (64 * 1024) / SECTOR_SIZE;
/** Sectors per bit of a chunk's mask (4 KiB: 16 bits cover the chunk). */
const BLOCK_SECTORS = (4 * 1024) / SECTOR_SIZE;
const MIN_SLOTS = 1024;
/** At most 2M slots (20 MiB per device): a 128 GiB cache's worth at 4 per chunk. */
const MAX_SLOTS = 1 << 21;
/** Slots per 64 KiB chunk of cache. */
const GHOST_FACTOR = 4;

/** Slots for a cache of `cacheSectors`: 4 per 64 KiB chunk of it, a power of two within [1024, 2M]. */
export function slotsFor(cacheSectors: number): number {
  const chunks = GHOST_FACTOR * Math.ceil(cacheSectors / CHUNK_SECTORS);
  let n = MIN_SLOTS;
  while (n < chunks && n < MAX_SLOTS) n *= 2;
  return n;
}

/** A chunk number's slot: a multiplicative hash of its two 32-bit halves. */
function slotOf(chunk: number, mask: number): number {
  const lo = chunk >>> 0;
  const hi = Math.floor(chunk / 0x1_0000_0000) >>> 0;
  const h = Math.imul(lo ^ Math.imul(hi, 0x85ebca6b), 0x9e3779b1);
  return (h ^ (h >>> 15)) & mask;
}

/** The second-hit rule's ghost table for one backing device on one cache. */
export class SecondHit {
  /** The chunk number + 1 held by each slot (0: empty). */
  private readonly tags: Float64Array;
  /** Which 4 KiB blocks of the slot's chunk were missed. */
  private readonly blocks: Uint16Array;
  private readonly slotMask: number;
  /** Misses filled, and misses left out (not seen before). */
  admitted = 0;
  declined = 0;

  constructor(slots: number) {
    if (!Number.isInteger(Math.log2(slots)) || slots < 1) {
      throw new RangeError(`admission: slots must be a power of two, got ${slots}`);
    }
    this.tags = new Float64Array(slots);
    this.blocks = new Uint16Array(slots);
    this.slotMask = slots - 1;
  }

  get slots(): number {
    return this.tags.length;
  }

  /**
   * A read missed sectors [start, end) (backing device sectors): whether to
   * fill it. Remembers the miss either way.
   */
  admit(start: number, end: number): boolean {
    let seen = false;
    const first = Math.floor(start / CHUNK_SECTORS);
    const last = Math.floor((end - 1) / CHUNK_SECTORS);
    for (let chunk = first; chunk <= last; chunk++) {
      const base = chunk * CHUNK_SECTORS;
      const a = Math.max(start, base) - base;
      const b = Math.min(end, base + CHUNK_SECTORS) - base;
      const lowBit = Math.floor(a / BLOCK_SECTORS);
      const highBit = Math.floor((b - 1) / BLOCK_SECTORS);
      const bits = ((1 << (highBit + 1)) - 1) & ~((1 << lowBit) - 1) & 0xffff;
      const slot = slotOf(chunk, this.slotMask);
      if (this.tags[slot] === chunk + 1) {
        const had = this.blocks[slot] ?? 0;
        if ((had & bits) !== 0) seen = true;
        this.blocks[slot] = had | bits;
      } else {
        this.tags[slot] = chunk + 1;
        this.blocks[slot] = bits;
      }
    }
    if (seen) this.admitted++;
    else this.declined++;
    return seen;
  }
}
