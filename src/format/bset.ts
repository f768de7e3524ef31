// struct bset and the btree node layout.
//
// A btree node occupies KEY_SIZE(node key) sectors at the node key's first
// pointer (one node per bucket, at most 256 KiB). It is a log: a sequence of
// bsets, each a sorted run of keys, appended at block granularity. Every bset
// of a node carries the same random 64-bit `seq`, chosen when the node is
// created (bch_bset_init_next); that is how a reader tells this node's bsets
// from stale bytes of the bucket's previous life.
//
//   bset: csum u64 @0, magic u64 @8 (set magic ^ BSET_MAGIC), seq u64 @16,
//         version u32 @24, keys u32 @28 (u64s of keys), keys from @32.
//
// Version 1 bsets (what every kernel since 3.10 writes) are checksummed with
// CRC-64 seeded with the raw value of the node key's ptr[0], over [8, end of
// keys) (btree_csum_set); version 0 used plain bch_crc64. A bset is written
// rounded up to the block size; the bytes after its keys are not covered.

import {
  bkeyCmp,
  btreePtrInvalid,
  decodeKeys,
  encodeKeys,
  extentInvalid,
  keysU64s,
  keyText,
  ptrValue,
  type Bkey,
  type CacheGeometry,
} from './bkey.ts';
import { BCACHE_BSET_VERSION, BSET_MAGIC, SECTOR_SIZE } from './constants.ts';
import { bchCrc64, seededCrc64 } from './crc64.ts';
import { FormatError, hex } from './errors.ts';

export const BSET_HEADER_BYTES = 32;

export interface BsetHeader {
  csum: bigint;
  magic: bigint;
  seq: bigint;
  version: number;
  /** Length of the keys in u64s. */
  u64s: number;
}

export interface Bset {
  magic: bigint;
  seq: bigint;
  version: number;
  keys: Bkey[];
}

/** Keys that write themselves (a btree node's in-memory key list, bcache/keylist.ts). */
export interface EncodableKeys {
  /** Their size on disk in u64s. */
  u64s(): number;
  /** Write them from byte `pos`; returns the position after them. */
  encode(buf: Buffer, pos: number): number;
}

/** bset_magic(): the magic of this set's bsets. */
export function bsetMagic(setMagic: bigint): bigint {
  return BigInt.asUintN(64, setMagic ^ BSET_MAGIC);
}

/** set_bytes(): header plus keys. */
export function bsetBytes(u64s: number): number {
  return BSET_HEADER_BYTES + 8 * u64s;
}

/** set_blocks(): blocks a set of `bytes` bytes takes. */
export function setBlocks(bytes: number, blockBytes: number): number {
  return Math.ceil(bytes / blockBytes);
}

export function readBsetHeader(buf: Buffer, pos: number): BsetHeader {
  return {
    csum: buf.readBigUInt64LE(pos),
    magic: buf.readBigUInt64LE(pos + 8),
    seq: buf.readBigUInt64LE(pos + 16),
    version: buf.readUInt32LE(pos + 24),
    u64s: buf.readUInt32LE(pos + 28),
  };
}

/** The checksum the bset at `pos` should carry, for its version; `seed` is the node's ptr[0] value. */
export function bsetChecksum(buf: Buffer, pos: number, u64s: number, version: number, seed: bigint): bigint {
  const end = pos + bsetBytes(u64s);
  return version === 0 ? bchCrc64(buf, pos + 8, end) : seededCrc64(seed, buf, pos + 8, end);
}

export interface EncodeBsetOptions {
  /** Raw value of the node key's ptr[0] (ptrValue(nodeKey.ptrs[0])). */
  seed: bigint;
  /** Block size in bytes: the result is padded with zeroes to a multiple of it. */
  blockBytes: number;
}

/** One bset, ready to be written at its block in the node (do_btree_node_write). */
export function encodeBset(
  bset: Omit<Bset, 'keys'> & { keys: readonly Bkey[] | EncodableKeys },
  options: EncodeBsetOptions,
): Buffer {
  const keys = bset.keys;
  const u64s = isKeyArray(keys) ? keysU64s(keys) : keys.u64s();
  const bytes = bsetBytes(u64s);
  const buf = Buffer.alloc(setBlocks(bytes, options.blockBytes) * options.blockBytes);
  buf.writeBigUInt64LE(BigInt.asUintN(64, bset.magic), 8);
  buf.writeBigUInt64LE(BigInt.asUintN(64, bset.seq), 16);
  buf.writeUInt32LE(bset.version, 24);
  buf.writeUInt32LE(u64s, 28);
  if (isKeyArray(keys)) encodeKeys(keys, buf, BSET_HEADER_BYTES);
  else keys.encode(buf, BSET_HEADER_BYTES);
  buf.writeBigUInt64LE(bsetChecksum(buf, 0, u64s, bset.version, options.seed), 0);
  return buf;
}

function isKeyArray(keys: readonly Bkey[] | EncodableKeys): keys is readonly Bkey[] {
  return Array.isArray(keys);
}

/** One bset of a decoded node. */
export interface NodeBset {
  /** Block index inside the node where the bset starts. */
  block: number;
  version: number;
  csum: bigint;
  keys: Bkey[];
}

export interface BtreeNode {
  /** The node's random sequence number, shared by its bsets. */
  seq: bigint;
  /** The bsets in the order they were written (later ones win on overlap). */
  bsets: NodeBset[];
  /** Blocks in use: where the next bset goes (b->written). */
  writtenBlocks: number;
}

export interface DecodeNodeOptions {
  /** The key pointing at this node (root key from the journal, or the parent's key). */
  nodeKey: Bkey;
  /** The set's magic (setMagic(sb)). */
  setMagic: bigint;
  /** Block size in sectors. */
  blockSize: number;
  /** 0 for a leaf (extents), more for interior nodes (btree pointers). */
  level?: number;
  /** With the cache geometry, also check no valid key lies past the node key ("short btree key"). */
  geometry?: CacheGeometry;
}

/**
 * Decode a btree node from its KEY_SIZE sectors, following the kernel's
 * bch_btree_node_read_done(): bsets are read while their seq matches the
 * first one; a matching seq with a bad version, size, magic or checksum, a
 * non-first bset with no keys, or the node's seq turning up again in a block
 * after the end of the log, is corruption (FormatError), not the end.
 */
export function decodeBtreeNode(buf: Buffer, options: DecodeNodeOptions): BtreeNode {
  const S = 'btree_node';
  const { nodeKey } = options;
  const first = nodeKey.ptrs[0];
  if (!first) throw new FormatError(S, 'key', `the node key ${keyText(nodeKey)} has no pointer`);
  const nodeBytes = nodeKey.size * SECTOR_SIZE;
  const blockBytes = options.blockSize * SECTOR_SIZE;
  if (nodeBytes === 0 || nodeBytes % blockBytes !== 0) {
    throw new FormatError(S, 'key', `node size ${nodeKey.size} sectors is not a whole number of blocks`);
  }
  if (buf.length < nodeBytes) {
    throw new FormatError(S, 'size', `${buf.length} bytes given, the node key says ${nodeBytes}`);
  }
  const seed = ptrValue(first);
  const magic = bsetMagic(options.setMagic);
  const nodeBlocks = nodeBytes / blockBytes;
  const at = (block: number): string => `bucket sector ${first.offset}, block ${block}`;

  const head = readBsetHeader(buf, 0);
  if (head.seq === 0n) {
    throw new FormatError(
      S,
      'seq',
      `the first bset has seq 0 at ${at(0)}: not a btree node (the kernel: "bad btree header")`,
    );
  }
  const bsets: NodeBset[] = [];
  let written = 0;
  while (written < nodeBlocks) {
    const pos = written * blockBytes;
    const h = readBsetHeader(buf, pos);
    if (h.seq !== head.seq) break;
    if (h.version > BCACHE_BSET_VERSION) {
      throw new FormatError(
        S,
        'version',
        `bset version ${h.version} at ${at(written)} is newer than ${BCACHE_BSET_VERSION}`,
      );
    }
    const bytes = bsetBytes(h.u64s);
    const blocks = setBlocks(bytes, blockBytes);
    if (written + blocks > nodeBlocks) {
      throw new FormatError(
        S,
        'keys',
        `bset at ${at(written)} has ${h.u64s} u64s of keys and runs past the node's end`,
      );
    }
    if (h.magic !== magic) {
      throw new FormatError(S, 'magic', `bset at ${at(written)} has magic ${hex(h.magic)}, expected ${hex(magic)}`);
    }
    const csum = bsetChecksum(buf, pos, h.u64s, h.version, seed);
    if (h.csum !== csum) {
      throw new FormatError(S, 'csum', `bset at ${at(written)} stores ${hex(h.csum)} but checksums to ${hex(csum)}`);
    }
    if (bsets.length > 0 && h.u64s === 0) {
      throw new FormatError(S, 'keys', `bset at ${at(written)} is empty (only a node's first bset may be)`);
    }
    const keys = decodeKeys(buf, pos + BSET_HEADER_BYTES, pos + bytes, 'bset');
    bsets.push({ block: written, version: h.version, csum: h.csum, keys });
    written += blocks;
  }
  for (let block = written; block < nodeBlocks; block++) {
    if (buf.readBigUInt64LE(block * blockBytes + 16) === head.seq) {
      throw new FormatError(
        S,
        'seq',
        `the node's seq appears again at ${at(block)}, after the end of its log: corrupted btree`,
      );
    }
  }
  if (options.geometry) checkShortKey(bsets, options.nodeKey, options.level ?? 0, options.geometry);
  return { seq: head.seq, bsets, writtenBlocks: written };
}

function checkShortKey(bsets: NodeBset[], nodeKey: Bkey, level: number, g: CacheGeometry): void {
  for (const b of bsets) {
    for (const k of b.keys) {
      const invalid = level === 0 ? extentInvalid(k, g) : btreePtrInvalid(k, g);
      if (!invalid && bkeyCmp(k, nodeKey) > 0) {
        throw new FormatError(
          'btree_node',
          'keys',
          `key ${keyText(k)} lies past the node's key ${keyText(nodeKey)} (the kernel: "short btree key")`,
        );
      }
    }
  }
}
