// struct uuid_entry: the uuid bucket's table of devices in a cache set.
//
// Slot i of the table is the device whose keys have KEY_INODE = i. 128 bytes
// per entry: uuid[16] @0, label[32] @16, first_reg u32 @48, last_reg u32 @52,
// invalidated u32 @56, flags u32 @60 (bit 0 UUID_FLASH_ONLY), sectors u64 @64
// (flash volume size), zero padding to 128. The table fills meta_bucket_bytes
// (c->nr_uuids entries) and has no checksum. An all-zero uuid is a free slot;
// INVALID_UUID marks a detached device's slot.
//
// Before journal version 1 the entries were 64 bytes (uuid_entry_v0: uuid,
// label, first_reg, last_reg, invalidated, pad; sometimes called "48-byte",
// which is only its uuid and label); uuid_read() converts such a table in
// place, giving flags = 0 and sectors = 0.

import { INVALID_UUID, UUID_ENTRY_BYTES, UUID_ENTRY_V0_BYTES, BCACHE_JSET_VERSION_UUIDV1 } from './constants.ts';
import { FormatError } from './errors.ts';
import { isZeroUuid } from './uuid-text.ts';

const S = 'uuid_entry';
export const UUID_FLASH_ONLY = 1;

export interface UuidEntry {
  uuid: Buffer;
  /** 32 bytes, copied from the backing superblock's label on attach. */
  label: Buffer;
  /** Unix seconds of the first and latest attach, and of invalidation. */
  firstReg: number;
  lastReg: number;
  invalidated: number;
  flags: number;
  /** Size of a flash-only volume in sectors. */
  sectors: number;
}

export function emptyUuidEntry(): UuidEntry {
  return {
    uuid: Buffer.alloc(16),
    label: Buffer.alloc(32),
    firstReg: 0,
    lastReg: 0,
    invalidated: 0,
    flags: 0,
    sectors: 0,
  };
}

export function isFreeSlot(e: UuidEntry): boolean {
  return isZeroUuid(e.uuid);
}

export function isInvalidatedSlot(e: UuidEntry): boolean {
  return e.uuid.equals(Buffer.from(INVALID_UUID));
}

export function isFlashOnly(e: UuidEntry): boolean {
  return (e.flags & UUID_FLASH_ONLY) !== 0;
}

export function decodeUuidEntry(buf: Buffer, pos: number): UuidEntry {
  const sectors = buf.readBigUInt64LE(pos + 64);
  if (sectors > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(S, 'sectors', `${sectors} is beyond 2^53`);
  return {
    uuid: Buffer.from(buf.subarray(pos, pos + 16)),
    label: Buffer.from(buf.subarray(pos + 16, pos + 48)),
    firstReg: buf.readUInt32LE(pos + 48),
    lastReg: buf.readUInt32LE(pos + 52),
    invalidated: buf.readUInt32LE(pos + 56),
    flags: buf.readUInt32LE(pos + 60),
    sectors: Number(sectors),
  };
}

/** The old 64-byte entry, converted as uuid_read() does. */
export function decodeUuidEntryV0(buf: Buffer, pos: number): UuidEntry {
  return {
    uuid: Buffer.from(buf.subarray(pos, pos + 16)),
    label: Buffer.from(buf.subarray(pos + 16, pos + 48)),
    firstReg: buf.readUInt32LE(pos + 48),
    lastReg: buf.readUInt32LE(pos + 52),
    invalidated: buf.readUInt32LE(pos + 56),
    flags: 0,
    sectors: 0,
  };
}

function checkEntry(e: UuidEntry): void {
  if (e.uuid.length !== 16) throw new FormatError(S, 'uuid', `${e.uuid.length} bytes, not 16`);
  if (e.label.length > 32) throw new FormatError(S, 'label', `${e.label.length} bytes, more than 32`);
  for (const [field, v] of [
    ['first_reg', e.firstReg],
    ['last_reg', e.lastReg],
    ['invalidated', e.invalidated],
    ['flags', e.flags],
  ] as const) {
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new FormatError(S, field, `${v} does not fit 32 bits`);
  }
  if (!Number.isSafeInteger(e.sectors) || e.sectors < 0)
    throw new FormatError(S, 'sectors', `${e.sectors} is not a sector count`);
}

export function encodeUuidEntry(e: UuidEntry, buf: Buffer, pos: number): void {
  checkEntry(e);
  buf.fill(0, pos, pos + UUID_ENTRY_BYTES);
  e.uuid.copy(buf, pos);
  e.label.copy(buf, pos + 16);
  buf.writeUInt32LE(e.firstReg, pos + 48);
  buf.writeUInt32LE(e.lastReg, pos + 52);
  buf.writeUInt32LE(e.invalidated, pos + 56);
  buf.writeUInt32LE(e.flags, pos + 60);
  buf.writeBigUInt64LE(BigInt(e.sectors), pos + 64);
}

/** The old 64-byte form (for tests and tools: the kernel only reads it). */
export function encodeUuidEntryV0(e: UuidEntry, buf: Buffer, pos: number): void {
  checkEntry(e);
  buf.fill(0, pos, pos + UUID_ENTRY_V0_BYTES);
  e.uuid.copy(buf, pos);
  e.label.copy(buf, pos + 16);
  buf.writeUInt32LE(e.firstReg, pos + 48);
  buf.writeUInt32LE(e.lastReg, pos + 52);
  buf.writeUInt32LE(e.invalidated, pos + 56);
}

/**
 * The table of a uuid bucket's bytes (meta_bucket_bytes of them): one entry per
 * 128 bytes, or, for a journal older than version 1, the old 64-byte entries.
 */
export function decodeUuidBucket(buf: Buffer, options: { jsetVersion: number }): UuidEntry[] {
  const count = Math.floor(buf.length / UUID_ENTRY_BYTES);
  const entries: UuidEntry[] = [];
  const old = options.jsetVersion < BCACHE_JSET_VERSION_UUIDV1;
  for (let i = 0; i < count; i++) {
    entries.push(old ? decodeUuidEntryV0(buf, i * UUID_ENTRY_V0_BYTES) : decodeUuidEntry(buf, i * UUID_ENTRY_BYTES));
  }
  return entries;
}

/** A uuid bucket of `bytes` bytes (meta_bucket_bytes) holding `entries`, free slots after them. */
export function encodeUuidBucket(entries: readonly UuidEntry[], bytes: number): Buffer {
  if (entries.length * UUID_ENTRY_BYTES > bytes) {
    throw new FormatError(S, 'count', `${entries.length} entries do not fit ${bytes} bytes`);
  }
  const buf = Buffer.alloc(bytes);
  entries.forEach((e, i) => {
    encodeUuidEntry(e, buf, i * UUID_ENTRY_BYTES);
  });
  return buf;
}
