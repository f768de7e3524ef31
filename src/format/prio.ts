// struct prio_set: the buckets that hold every bucket's priority and generation.
//
//   csum u64 @0, magic u64 @8 (set magic ^ PSET_MAGIC), seq u64 @16,
//   version u32 @24, pad u32 @28, next_bucket u64 @32, then packed 3-byte
//   entries {prio u16, gen u8} from @40.
//
// One prio bucket holds priosPerBucket() entries and is meta_bucket_bytes long
// (the bucket, capped at 4 MiB); the checksum is bch_crc64 over [8, that end),
// the whole used part of the bucket. The buckets form a list: the journal
// records the first (jset.prio_bucket[dev]), each names the next.
// bch_prio_write() fills them last to first from one buffer, so the tail of
// the last bucket (past nbuckets) holds stale entries: a decoded bucket keeps
// all its entries so it re-encodes to the same bytes.

import { metaBucketBytes, PRIO_ENTRY_BYTES, PRIO_SET_HEADER_BYTES, priosPerBucket, PSET_MAGIC } from './constants.ts';
import { bchCrc64 } from './crc64.ts';
import { FormatError, hex } from './errors.ts';

const S = 'prio_set';

export interface PrioSet {
  /** Incremented by every bch_prio_write(); the same in every bucket of one write. */
  seq: number;
  /** Never set by the kernel (0). */
  version: number;
  pad: number;
  /** The next prio bucket, 0 at the end of the list. */
  nextBucket: number;
  /** priosPerBucket() entries each. */
  prios: Uint16Array;
  gens: Uint8Array;
}

/** pset_magic(). */
export function psetMagic(setMagic: bigint): bigint {
  return BigInt.asUintN(64, setMagic ^ PSET_MAGIC);
}

export interface PrioOptions {
  setMagic: bigint;
  /** Bucket size in sectors (fixes the bucket's used size and entry count). */
  bucketSize: number;
}

function safe(v: bigint, field: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(S, field, `${v} is beyond 2^53`);
  return Number(v);
}

/** Decode one prio bucket; checks the checksum, then the magic, as prio_read() does. */
export function decodePrioBucket(buf: Buffer, options: PrioOptions): PrioSet {
  const bytes = metaBucketBytes(options.bucketSize);
  if (buf.length < bytes) throw new FormatError(S, 'size', `${buf.length} bytes given, a prio bucket is ${bytes}`);
  const stored = buf.readBigUInt64LE(0);
  const csum = bchCrc64(buf, 8, bytes);
  if (stored !== csum)
    throw new FormatError(S, 'csum', `stored ${hex(stored)} but the bucket checksums to ${hex(csum)}`);
  const magic = buf.readBigUInt64LE(8);
  const want = psetMagic(options.setMagic);
  if (magic !== want) throw new FormatError(S, 'magic', `${hex(magic)} is not this set's prio magic ${hex(want)}`);
  const n = priosPerBucket(options.bucketSize);
  const prios = new Uint16Array(n);
  const gens = new Uint8Array(n);
  for (let i = 0, at = PRIO_SET_HEADER_BYTES; i < n; i++, at += PRIO_ENTRY_BYTES) {
    prios[i] = buf.readUInt16LE(at);
    gens[i] = buf.readUInt8(at + 2);
  }
  return {
    seq: safe(buf.readBigUInt64LE(16), 'seq'),
    version: buf.readUInt32LE(24),
    pad: buf.readUInt32LE(28),
    nextBucket: safe(buf.readBigUInt64LE(32), 'next_bucket'),
    prios,
    gens,
  };
}

/** The meta_bucket_bytes to write for one prio bucket. */
export function encodePrioBucket(p: PrioSet, options: PrioOptions): Buffer {
  const bytes = metaBucketBytes(options.bucketSize);
  const n = priosPerBucket(options.bucketSize);
  if (p.prios.length !== n || p.gens.length !== n) {
    throw new FormatError(S, 'data', `${p.prios.length} prios and ${p.gens.length} gens given, a bucket holds ${n}`);
  }
  const buf = Buffer.alloc(bytes);
  buf.writeBigUInt64LE(psetMagic(options.setMagic), 8);
  buf.writeBigUInt64LE(BigInt(p.seq), 16);
  buf.writeUInt32LE(p.version, 24);
  buf.writeUInt32LE(p.pad, 28);
  buf.writeBigUInt64LE(BigInt(p.nextBucket), 32);
  for (let i = 0, at = PRIO_SET_HEADER_BYTES; i < n; i++, at += PRIO_ENTRY_BYTES) {
    buf.writeUInt16LE(p.prios[i] ?? 0, at);
    buf.writeUInt8(p.gens[i] ?? 0, at + 2);
  }
  buf.writeBigUInt64LE(bchCrc64(buf, 8, bytes), 0);
  return buf;
}
