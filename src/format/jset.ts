// struct jset: one journal entry, and the rules for reading the journal.
//
//   csum u64 @0, magic u64 @8 (set magic ^ JSET_MAGIC), seq u64 @16,
//   version u32 @24 (1), keys u32 @28 (u64s), last_seq u64 @32,
//   uuid_bucket: a key padded to 8 u64s @40, btree_root: likewise @104,
//   btree_level u16 @168, pad[3] @170, prio_bucket[8] u64 @176, keys from @240.
//
// The checksum is bch_crc64 over [8, 240 + 8 * keys). An entry is written
// rounded up to the cache's block size and is at most 32 KiB. The kernel never
// zeroes its journal buffers, so the padding of the two key slots, pad[3] and
// the unused prio_bucket entries may hold old bytes; they are checksummed, so
// a decoded entry keeps its raw header and re-encoding reproduces it.

import { BKEY_PAD, bkeyU64sAt, decodeBkey, decodeKeys, encodeBkey, encodeKeys, keysU64s, type Bkey } from './bkey.ts';
import { JSET_MAGIC, JSET_MAX_BYTES, MAX_CACHES_PER_SET, SECTOR_SIZE } from './constants.ts';
import { bchCrc64 } from './crc64.ts';
import { FormatError, hex } from './errors.ts';

const S = 'jset';
export const JSET_HEADER_BYTES = 240;
const UUID_BUCKET_AT = 40;
const BTREE_ROOT_AT = 104;
const BTREE_LEVEL_AT = 168;
const PRIO_BUCKET_AT = 176;

export interface Jset {
  /** Monotonic, unique per entry. */
  seq: number;
  /** The oldest entry whose keys are not yet in written btree nodes: replay starts there. */
  lastSeq: number;
  version: number;
  /** Where the uuid bucket is (a btree-pointer-like key: size = meta bucket sectors). */
  uuidBucket: Bkey;
  /** The root node's key (inode MAX_KEY_INODE, offset MAX_KEY_OFFSET, size = node sectors). */
  btreeRoot: Bkey;
  btreeLevel: number;
  /** First prio bucket of each cache device (only [nr_this_dev] is written). */
  prioBucket: number[];
  /** Keys inserted into leaf nodes, to be replayed in order. */
  keys: Bkey[];
  /** The 240-byte header as read; encoding writes the fields over a copy of it. */
  header?: Buffer;
}

/** jset_magic(). */
export function jsetMagic(setMagic: bigint): bigint {
  return BigInt.asUintN(64, setMagic ^ JSET_MAGIC);
}

/** set_bytes() of a jset with `u64s` u64s of keys. */
export function jsetBytes(u64s: number): number {
  return JSET_HEADER_BYTES + 8 * u64s;
}

function safeU64(buf: Buffer, pos: number, field: string): number {
  const v = buf.readBigUInt64LE(pos);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(S, field, `${v} is beyond 2^53`);
  return Number(v);
}

function decodePaddedKey(buf: Buffer, pos: number, field: string): Bkey {
  if (bkeyU64sAt(buf, pos) > BKEY_PAD) {
    throw new FormatError(
      S,
      field,
      `a key with ${bkeyU64sAt(buf, pos) - 2} pointers does not fit its ${BKEY_PAD}-u64 slot`,
    );
  }
  return decodeBkey(buf, pos, `${S}.${field}`);
}

export interface DecodeJsetOptions {
  setMagic: bigint;
  /**
   * Check the entry and decode its header but not its keys (`keys` is empty):
   * bring-up reads every entry of the ring but replays only the newest few.
   */
  headerOnly?: boolean;
}

/**
 * Decode the journal entry at byte `pos` (of a bucket's bytes). Checks, in the
 * kernel's order (journal_read_bucket): magic, size, checksum.
 */
export function decodeJset(buf: Buffer, pos: number, options: DecodeJsetOptions): Jset {
  if (pos + JSET_HEADER_BYTES > buf.length) {
    throw new FormatError(S, 'size', `no room for a journal entry header at byte ${pos} of ${buf.length}`);
  }
  const magic = buf.readBigUInt64LE(pos + 8);
  const want = jsetMagic(options.setMagic);
  if (magic !== want) throw new FormatError(S, 'magic', `${hex(magic)} is not this set's journal magic ${hex(want)}`);
  const u64s = buf.readUInt32LE(pos + 28);
  const bytes = jsetBytes(u64s);
  if (bytes > JSET_MAX_BYTES || pos + bytes > buf.length) {
    throw new FormatError(
      S,
      'keys',
      `${u64s} u64s of keys (${bytes} bytes) do not fit (at most ${Math.min(JSET_MAX_BYTES, buf.length - pos)})`,
    );
  }
  const stored = buf.readBigUInt64LE(pos);
  const csum = bchCrc64(buf, pos + 8, pos + bytes);
  if (stored !== csum)
    throw new FormatError(S, 'csum', `stored ${hex(stored)} but the entry checksums to ${hex(csum)}`);
  const prioBucket: number[] = [];
  for (let i = 0; i < MAX_CACHES_PER_SET; i++)
    prioBucket.push(safeU64(buf, pos + PRIO_BUCKET_AT + 8 * i, 'prio_bucket'));
  return {
    seq: safeU64(buf, pos + 16, 'seq'),
    lastSeq: safeU64(buf, pos + 32, 'last_seq'),
    version: buf.readUInt32LE(pos + 24),
    uuidBucket: decodePaddedKey(buf, pos + UUID_BUCKET_AT, 'uuid_bucket'),
    btreeRoot: decodePaddedKey(buf, pos + BTREE_ROOT_AT, 'btree_root'),
    btreeLevel: buf.readUInt16LE(pos + BTREE_LEVEL_AT),
    prioBucket,
    keys: options.headerOnly === true ? [] : decodeKeys(buf, pos + JSET_HEADER_BYTES, pos + bytes, S),
    header: Buffer.from(buf.subarray(pos, pos + JSET_HEADER_BYTES)),
  };
}

export interface EncodeJsetOptions {
  setMagic: bigint;
  /** Block size in bytes: the entry is padded with zeroes to a multiple of it. */
  blockBytes: number;
}

/** A journal entry as journal_write_unlocked() writes it. */
export function encodeJset(j: Jset, options: EncodeJsetOptions): Buffer {
  const u64s = keysU64s(j.keys);
  const bytes = jsetBytes(u64s);
  if (bytes > JSET_MAX_BYTES)
    throw new FormatError(S, 'keys', `${bytes} bytes is more than a journal entry holds (${JSET_MAX_BYTES})`);
  for (const [field, k] of [
    ['uuid_bucket', j.uuidBucket],
    ['btree_root', j.btreeRoot],
  ] as const) {
    if (2 + k.ptrs.length > BKEY_PAD) throw new FormatError(S, field, `${k.ptrs.length} pointers do not fit the slot`);
  }
  if (j.prioBucket.length > MAX_CACHES_PER_SET) throw new FormatError(S, 'prio_bucket', 'at most 8 entries');
  const buf = Buffer.alloc(Math.ceil(bytes / options.blockBytes) * options.blockBytes);
  if (j.header) j.header.copy(buf, 0, 0, JSET_HEADER_BYTES);
  buf.writeBigUInt64LE(jsetMagic(options.setMagic), 8);
  buf.writeBigUInt64LE(BigInt(j.seq), 16);
  buf.writeUInt32LE(j.version, 24);
  buf.writeUInt32LE(u64s, 28);
  buf.writeBigUInt64LE(BigInt(j.lastSeq), 32);
  encodeBkey(j.uuidBucket, buf, UUID_BUCKET_AT);
  encodeBkey(j.btreeRoot, buf, BTREE_ROOT_AT);
  buf.writeUInt16LE(j.btreeLevel, BTREE_LEVEL_AT);
  j.prioBucket.forEach((b, i) => buf.writeBigUInt64LE(BigInt(b), PRIO_BUCKET_AT + 8 * i));
  encodeKeys(j.keys, buf, JSET_HEADER_BYTES);
  buf.writeBigUInt64LE(bchCrc64(buf, 8, bytes), 0);
  return buf;
}

/** Where and why the scan of a journal bucket stopped. */
export interface BucketScanEnd {
  /** Byte offset in the bucket. */
  offset: number;
  reason: 'bad magic' | 'too big' | 'bad csum' | 'end of bucket';
}

export interface JournalBucketScan {
  entries: Jset[];
  /** Byte offset of each entry in the bucket. */
  offsets: number[];
  end: BucketScanEnd;
}

/**
 * The entries of one journal bucket, in order (journal_read_bucket): read
 * from the bucket's start, one entry after another at block granularity; the
 * first bad magic, oversized entry or bad checksum ends the bucket (it is
 * where writing stopped, not an error).
 */
export function scanJournalBucket(
  bucket: Buffer,
  options: { setMagic: bigint; blockSize: number; headerOnly?: boolean },
): JournalBucketScan {
  const blockBytes = options.blockSize * SECTOR_SIZE;
  const magic = jsetMagic(options.setMagic);
  const entries: Jset[] = [];
  const offsets: number[] = [];
  let offset = 0;
  while (offset + JSET_HEADER_BYTES <= bucket.length) {
    if (bucket.readBigUInt64LE(offset + 8) !== magic) return { entries, offsets, end: { offset, reason: 'bad magic' } };
    const bytes = jsetBytes(bucket.readUInt32LE(offset + 28));
    if (bytes > JSET_MAX_BYTES || offset + bytes > bucket.length)
      return { entries, offsets, end: { offset, reason: 'too big' } };
    if (bucket.readBigUInt64LE(offset) !== bchCrc64(bucket, offset + 8, offset + bytes)) {
      return { entries, offsets, end: { offset, reason: 'bad csum' } };
    }
    // Past the checks above, a decoding error is corruption the checksum did not catch: it propagates.
    entries.push(decodeJset(bucket, offset, options));
    offsets.push(offset);
    offset += Math.ceil(bytes / blockBytes) * blockBytes;
  }
  return { entries, offsets, end: { offset, reason: 'end of bucket' } };
}

/**
 * The entries to replay, oldest first (bch_journal_read's list): one per seq,
 * from the newest entry's last_seq on. Entries older than that are already in
 * written btree nodes.
 */
export function selectReplayEntries(entries: Iterable<Jset>): Jset[] {
  const bySeq = new Map<number, Jset>();
  let newest: Jset | undefined;
  for (const j of entries) {
    if (!bySeq.has(j.seq)) bySeq.set(j.seq, j);
    if (!newest || j.seq > newest.seq) newest = j;
  }
  if (!newest) return [];
  const from = newest.lastSeq;
  return [...bySeq.values()].filter((j) => j.seq >= from).sort((a, b) => a.seq - b.seq);
}

/**
 * Ranges of seqs missing between the newest entry's last_seq and its seq
 * (bch_journal_replay refuses to replay over a gap: "journal entries X-Y
 * missing!"). `replay` is selectReplayEntries()'s result.
 */
export function missingJournalRanges(replay: readonly Jset[]): Array<[number, number]> {
  const newest = replay[replay.length - 1];
  if (!newest) return [];
  const gaps: Array<[number, number]> = [];
  let n = newest.lastSeq;
  for (const j of replay) {
    if (j.seq !== n) gaps.push([n, j.seq - 1]);
    n = j.seq + 1;
  }
  return gaps;
}
