// The uuid table (super.c uuid_io, uuid_read, __uuid_write): slot i is the
// device whose keys have KEY_INODE = i. The whole table lives in one bucket,
// rewritten to a fresh bucket on every change (R4: write, flush, then a
// journal entry naming the new bucket; the previous bucket is freed after
// that entry is durable).

import { makeKey, makePtr, type Bkey } from '../format/bkey.ts';
import { INVALID_UUID, metaBucketBytes, UUID_ENTRY_BYTES } from '../format/constants.ts';
import { randomBytes } from 'node:crypto';
import {
  decodeUuidBucket,
  emptyUuidEntry,
  encodeUuidBucket,
  isFlashOnly,
  isFreeSlot,
  UUID_FLASH_ONLY,
  type UuidEntry,
} from '../format/uuid.ts';
import { RESERVE_BTREE, type Allocator } from './alloc.ts';
import type { Buckets } from './buckets.ts';
import type { CacheIo } from './io.ts';

export interface UuidHost {
  io: CacheIo;
  buckets: Buckets;
  allocator: Allocator;
  commitJournal(): Promise<void>;
  afterCommit(fn: () => void): void;
}

export class UuidTable {
  private readonly host: UuidHost;
  readonly slots: number;
  private readonly tableBytes: number;
  entries: UuidEntry[];
  /** Where the table is (jset.uuid_bucket); no pointer before the first write. */
  key: Bkey = makeKey(0, 0, 0);

  constructor(host: UuidHost) {
    this.host = host;
    this.tableBytes = metaBucketBytes(host.buckets.bucketSize);
    this.slots = this.tableBytes / UUID_ENTRY_BYTES;
    this.entries = Array.from({ length: this.slots }, () => emptyUuidEntry());
  }

  /** The bucket the table is in, or undefined before the first write. */
  get bucket(): number | undefined {
    const p = this.key.ptrs[0];
    return p ? this.host.buckets.bucketOf(p) : undefined;
  }

  /** uuid_read(): the table `key` points at; before jset version 1, the old 48-byte entries. */
  async read(key: Bkey, jsetVersion: number): Promise<void> {
    const p = key.ptrs[0];
    if (!p) throw new Error('uuid table: the key has no pointer');
    const sectors = Math.min(key.size, this.host.buckets.bucketSize);
    const buf = Buffer.alloc(Math.max(sectors * 512, this.tableBytes));
    await this.host.io.read(buf.subarray(0, sectors * 512), p.offset);
    this.entries = decodeUuidBucket(buf.subarray(0, this.tableBytes), { jsetVersion }).slice(0, this.slots);
    this.key = key;
  }

  /**
   * bch_uuid_write(): the table to a fresh bucket, R4, then free the old one.
   * Without `wait` (__uuid_write at bring-up) the journal entry naming it is
   * not waited for: the next one will.
   */
  async write(wait = true): Promise<void> {
    const { io, buckets: b, allocator } = this.host;
    const bucket = await allocator.alloc(RESERVE_BTREE, true);
    if (bucket === undefined) throw new Error('uuid write: no bucket');
    const sectors = b.bucketSize;
    const buf = Buffer.alloc(sectors * 512);
    encodeUuidBucket(this.entries, this.tableBytes).copy(buf);
    try {
      await io.writeMeta(buf, b.sector(bucket));
      await io.flush();
    } catch (err) {
      b.unpinBucket(bucket);
      throw err;
    }
    const old = this.bucket;
    this.key = makeKey(0, 0, sectors, false, [makePtr(0, b.sector(bucket), b.gen[bucket] ?? 0)]);
    b.unpinBucket(bucket);
    if (old !== undefined) {
      this.host.afterCommit(() => {
        allocator.freeBucket(old);
      });
    }
    if (wait) await this.host.commitJournal();
  }

  /** uuid_find(): the slot holding `uuid`, or -1. */
  find(uuid: Buffer): number {
    return this.entries.findIndex((e) => e.uuid.equals(uuid));
  }

  /** uuid_find_empty(): the first never-used slot (invalidated slots are not reused), or -1. */
  findEmpty(): number {
    return this.entries.findIndex(isFreeSlot);
  }

  get(slot: number): UuidEntry {
    const e = this.entries[slot];
    if (!e) throw new RangeError(`uuid table: no slot ${slot} (the table has ${this.slots})`);
    return e;
  }

  /** Change a slot in memory; write() makes it durable. */
  set(slot: number, entry: UuidEntry): void {
    if (slot < 0 || slot >= this.slots) throw new RangeError(`uuid table: no slot ${slot}`);
    this.entries[slot] = entry;
  }

  /** Mark a slot detached (its cached data is orphaned); the slot is never reused. */
  invalidate(slot: number, now: number): void {
    const e = this.get(slot);
    e.uuid = Buffer.from(INVALID_UUID);
    e.invalidated = now;
  }

  /** The slots of flash-only volumes, in slot order (flash_devs_run). */
  flashSlots(): number[] {
    const out: number[] = [];
    this.entries.forEach((e, i) => {
      if (isFlashOnly(e) && !isFreeSlot(e)) out.push(i);
    });
    return out;
  }

  /**
   * bch_flash_dev_create()'s slot, in memory (write() makes it durable): the
   * first free slot gets a random uuid, an empty label, first_reg = last_reg
   * = `now`, UUID_FLASH_ONLY and `bytes` >> 9 sectors. Returns the slot, or
   * -1 when the table is full.
   */
  createFlash(bytes: number, now: number): number {
    if (!Number.isSafeInteger(bytes) || bytes < 0)
      throw new RangeError(`flash volume size ${bytes} is not a byte count`);
    const slot = this.findEmpty();
    if (slot < 0) return -1;
    let uuid = randomBytes(16);
    while (isFreeSlot({ ...emptyUuidEntry(), uuid })) uuid = randomBytes(16);
    this.set(slot, {
      uuid,
      label: Buffer.alloc(32),
      firstReg: now,
      lastReg: now,
      invalidated: 0,
      flags: UUID_FLASH_ONLY,
      sectors: Math.floor(bytes / 512),
    });
    return slot;
  }
}
