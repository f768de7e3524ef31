// A copy in memory of the cache blocks read most, so that the hottest hits
// cost a memory copy instead of a system call.
//
// Why: a hit served by readNow reads the cache device with one preadv2 from
// the page cache, and on the hit path that system call was the largest single
// cost (16 % of the daemon's CPU in the remote Zipf row, about 3 us a hit on
// a paravirtualised VM where every system call traps to the hypervisor;
// docs/performance.md, "Hot blocks in memory"). Skewed workloads read a small
// set of blocks most of the time (Zipf 1.2 over 256000 blocks: the hottest
// 8192 take about 90 % of the reads), and that set fits in a few MiB.
//
// This is ubcache's own: the kernel's bcache has nothing like it, as a host's
// page cache sits above its block device; NBD clients that read with
// O_DIRECT (qemu with cache=none, fio) have none. It changes nothing on disk
// and nothing in what a read returns.
//
// Validity without invalidation messages. An entry is keyed by where its data
// is on the cache device (the sector) and by the reuse count of the bucket
// holding it (Buckets.reuse): bcache writes a data bucket's sectors once per
// use of the bucket (the allocator hands out each sector once between taking
// the bucket and invalidating it again), so data at a sector cannot change
// while the bucket's reuse count stays the same. Every path that can put new
// data where old data was goes through Buckets.invalidate() or the
// allocator's take, which count a reuse; an entry of an older count is dead,
// whatever a key says. The caller only asks for sectors a live key points to,
// found and checked in the same turn (readNow), so nothing runs between the
// key's check and the copy.
//
// Shape. Entries are pages of up to 4 KiB keyed by their first sector; a read
// of up to RAM_MAX_READ bytes is served when every one of its pages is present
// (each at least as long as the part of the read it covers), and admitted
// page by page when it was read from the device. The table is 4-way set
// associative with a clock hand per set: a hit sets an entry's reference bit,
// the hand clears bits as it passes and takes the first entry whose bit is
// clear, so a block read once does not push out one read often. Data lives in
// 1 MiB slabs allocated on first use and kept (fresh memory costs a page fault
// a page here, docs/performance.md): a daemon that never hits never pays for it.

import { SECTOR_SIZE } from '../format/constants.ts';

/** Bytes per entry. */
export const RAM_PAGE = 4096;
const PAGE_SECTORS = RAM_PAGE / SECTOR_SIZE;
const WAYS = 4;
const SLAB_BYTES = 1024 * 1024;
const SLAB_PAGES = SLAB_BYTES / RAM_PAGE;
/** ram_cache_size when nobody set it: 32 MiB, 8192 blocks of 4 KiB. */
export const RAM_CACHE_DEFAULT = 32 * 1024 * 1024;
/** The most ram_cache_size takes: 16 GiB. */
export const RAM_CACHE_MAX = 16 * 1024 * 1024 * 1024;
/** The longest read served or admitted (8 pages): longer hits are rare and cost the device little per byte. */
export const RAM_MAX_READ = 32 * 1024;

export interface RamCacheStats {
  /** Reads served from memory. */
  hits: number;
  /** Reads it was asked for and could not serve. */
  misses: number;
  /** Pages copied in. */
  admitted: number;
}

export class RamCache {
  /** Reuse count per bucket, owned by Buckets (see the header). */
  private readonly reuse: Uint32Array;
  private readonly bucketSize: number;
  private sets = 0;
  /** Per entry: first sector (-1: empty), its bucket's reuse count, bytes held, reference bit. */
  private sector = new Float64Array(0);
  private epoch = new Uint32Array(0);
  private length = new Uint16Array(0);
  private ref = new Uint8Array(0);
  private hand = new Uint8Array(0);
  private slabs: Array<Buffer | undefined> = [];
  /** The entries of the read being looked at (read, admit). */
  private readonly found = new Int32Array(RAM_MAX_READ / RAM_PAGE);
  readonly stats: RamCacheStats = { hits: 0, misses: 0, admitted: 0 };
  private bytes = 0;

  constructor(reuse: Uint32Array, bucketSize: number, bytes: number) {
    this.reuse = reuse;
    this.bucketSize = bucketSize;
    this.resize(bytes);
  }

  /** The memory it may use, in bytes (rounded down to whole sets of 4 pages). */
  get size(): number {
    return this.bytes;
  }

  /** Bytes of slabs allocated so far. */
  get allocated(): number {
    let n = 0;
    for (const s of this.slabs) if (s !== undefined) n += s.length;
    return n;
  }

  /** Change the size; everything held is dropped (0 turns it off and frees the memory). */
  resize(bytes: number): void {
    const sets = Math.floor(bytes / (RAM_PAGE * WAYS));
    const entries = sets * WAYS;
    this.sets = sets;
    this.bytes = entries * RAM_PAGE;
    this.sector = new Float64Array(entries).fill(-1);
    this.epoch = new Uint32Array(entries);
    this.length = new Uint16Array(entries);
    this.ref = new Uint8Array(entries);
    this.hand = new Uint8Array(sets);
    this.slabs = new Array<Buffer | undefined>(Math.ceil(entries / SLAB_PAGES)).fill(undefined);
  }

  /**
   * Copy the `buf.length` bytes at `sector` (all in bucket `bucket`, as one
   * extent's data always is) into buf if every page of them is held for the
   * bucket's current use; false, with buf untouched, if not.
   */
  read(buf: Buffer, sector: number, bucket: number): boolean {
    const n = buf.length;
    if (this.sets === 0 || n === 0 || n > RAM_MAX_READ) return false;
    const epoch = this.reuse[bucket] ?? 0;
    const found = this.found;
    const pages = Math.ceil(n / RAM_PAGE);
    for (let i = 0; i < pages; i++) {
      const e = this.lookup(sector + i * PAGE_SECTORS, epoch, Math.min(RAM_PAGE, n - i * RAM_PAGE));
      if (e < 0) {
        this.stats.misses++;
        return false;
      }
      found[i] = e;
    }
    for (let i = 0; i < pages; i++) {
      const e = found[i] as number;
      this.ref[e] = 1;
      const slab = this.slabs[Math.floor(e / SLAB_PAGES)] as Buffer;
      const at = (e % SLAB_PAGES) * RAM_PAGE;
      slab.copy(buf, i * RAM_PAGE, at, at + Math.min(RAM_PAGE, n - i * RAM_PAGE));
    }
    this.stats.hits++;
    return true;
  }

  /** Keep a copy of `buf`, just read from `sector` in bucket `bucket` for the bucket's current use. */
  admit(buf: Buffer, sector: number, bucket: number): void {
    const n = buf.length;
    if (this.sets === 0 || n === 0 || n > RAM_MAX_READ) return;
    const epoch = this.reuse[bucket] ?? 0;
    for (let i = 0, at = 0; at < n; i++, at += RAM_PAGE) {
      const s = sector + i * PAGE_SECTORS;
      const len = Math.min(RAM_PAGE, n - at);
      const held = this.lookup(s, epoch, 1);
      if (held >= 0 && (this.length[held] as number) >= len) continue;
      // A shorter copy of the same page is replaced in place, not kept beside the longer one.
      const e = held >= 0 ? held : this.victim(s);
      const slabIndex = Math.floor(e / SLAB_PAGES);
      const slab = (this.slabs[slabIndex] ??= Buffer.alloc(SLAB_BYTES));
      buf.copy(slab, (e % SLAB_PAGES) * RAM_PAGE, at, at + len);
      this.sector[e] = s;
      this.epoch[e] = epoch;
      this.length[e] = len;
      this.ref[e] = 0;
      this.stats.admitted++;
    }
  }

  /** The entry holding at least `len` bytes at `sector` for reuse count `epoch`, or -1. */
  private lookup(sector: number, epoch: number, len: number): number {
    const base = this.setOf(sector) * WAYS;
    const sectors = this.sector;
    for (let w = 0; w < WAYS; w++) {
      const e = base + w;
      if (sectors[e] === sector && this.epoch[e] === epoch && (this.length[e] as number) >= len) return e;
    }
    return -1;
  }

  /** The entry of `sector`'s set to overwrite: an empty or dead one, else the clock's choice. */
  private victim(sector: number): number {
    const set = this.setOf(sector);
    const base = set * WAYS;
    for (let w = 0; w < WAYS; w++) {
      const e = base + w;
      const s = this.sector[e] as number;
      if (s < 0 || this.epoch[e] !== this.reuse[Math.floor(s / this.bucketSize)]) return e;
    }
    let h = this.hand[set] as number;
    for (;;) {
      const e = base + h;
      h = (h + 1) % WAYS;
      if (this.ref[e] === 0) {
        this.hand[set] = h;
        return e;
      }
      this.ref[e] = 0;
    }
  }

  private setOf(sector: number): number {
    const page = Math.floor(sector / PAGE_SECTORS);
    const h = Math.imul((page >>> 0) ^ Math.floor(page / 0x100000000), 0x9e3779b1);
    return ((h ^ (h >>> 16)) >>> 0) % this.sets;
  }
}
