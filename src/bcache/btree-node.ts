// One btree node: its bytes on disk and its state in memory.
//
// On disk a node is a log of bsets in its bucket, all sharing the node's
// random seq, each appended at the next free block and checksummed with the
// node pointer as seed. In memory (docs/engine.md §5):
//
//   keys     the merged view, sorted and non-overlapping: what the node says.
//            Leaves keep stale keys (GC must see their gens; lookups check
//            staleness anyway, since buckets are reused under live keys) and
//            drop keys that mean "nothing here": no pointers, or a pointer to
//            no device (the kernel's cache-miss placeholders).
//   pending  leaves only: the keys inserted since the last write, as inserted
//            (invalidations included, so they override older bsets), sorted
//            and trimmed against each other: exactly the next bset.
//   written  blocks already on disk: where the next bset goes.
//
// Interior nodes are never appended to: any change writes a new node (see
// btree.ts), so their pending set stays empty.

import { randomBytes } from 'node:crypto';
import {
  btreePtrInvalid,
  bkeyU64s,
  decodeKeys,
  extentInvalid,
  keyText,
  posCmp,
  ptrAvailable,
  ptrValue,
  type Bkey,
  type CacheGeometry,
} from '../format/bkey.ts';
import {
  BSET_HEADER_BYTES,
  bsetBytes,
  bsetChecksum,
  bsetMagic,
  encodeBset,
  readBsetHeader,
  setBlocks,
} from '../format/bset.ts';
import { BCACHE_BSET_VERSION, SECTOR_SIZE } from '../format/constants.ts';
import { FormatError, hex } from '../format/errors.ts';
import { defined } from '../util/assert.ts';
import { mergeNewer, normalizeSet } from './extents.ts';
import { KeyList } from './keylist.ts';

export interface NodeGeometry {
  cache: CacheGeometry;
  setMagic: bigint;
  blockBytes: number;
  /** KEY_SIZE of a node pointer. */
  nodeSectors: number;
  nodeBytes: number;
  nodeBlocks: number;
}

export function nodeGeometry(
  cache: CacheGeometry,
  setMagic: bigint,
  blockSize: number,
  nodeSectors: number,
): NodeGeometry {
  const blockBytes = blockSize * SECTOR_SIZE;
  const nodeBytes = nodeSectors * SECTOR_SIZE;
  return { cache, setMagic, blockBytes, nodeSectors, nodeBytes, nodeBlocks: nodeBytes / blockBytes };
}

/** A fresh random node seq (never 0: a zero seq means "not a node"). */
export function randomSeq(): bigint {
  for (;;) {
    const v = randomBytes(8).readBigUInt64LE(0);
    if (v !== 0n) return v;
  }
}

/** A journal entry as a pin: entries are ordered by creation (their seq is assigned when written). */
export interface JournalPin {
  readonly order: number;
  /** References held on the entry; the journal keeps it while any remain. */
  pins: number;
}

/** The older of two pins. */
export function olderPin(a: JournalPin, b: JournalPin): boolean {
  return a.order < b.order;
}

export class BtreeNode {
  /** The pointer to this node; its position is the largest key the node may hold. */
  key: Bkey;
  readonly level: number;
  readonly seq: bigint;
  keys: KeyList;
  pending = new KeyList();
  /** u64s of `keys` and of `pending`, kept up to date for the fit checks. */
  viewU64s: number;
  pendingU64s = 0;
  written: number;
  /** Oldest journal entry whose keys are in `pending` (R5). */
  pin: JournalPin | undefined;
  /** The pin of the bset being written, released once a flush covers it. */
  writingPin: JournalPin | undefined;
  writing: Promise<void> | undefined;
  /**
   * The flush epoch that makes this node's last completed write durable (0:
   * nothing unflushed). An append waits for it first: without a flush between
   * them the device may keep a later bset and lose an earlier one, and a node
   * whose seq shows up past a hole is unreadable (the kernel's "corrupted
   * btree").
   */
  unflushedEpoch = 0;
  /**
   * The flush epoch that makes the data of `pending`'s newest key durable
   * (0: none). A leaf append lands in a node the durable tree already
   * reaches, with no jset to order it behind a flush: written while a key's
   * data is not yet durable, a power cut may keep the bset and drop the data,
   * and the key then serves whatever the sectors held before.
   */
  pendingDataEpoch = 0;
  /** Replaced by a rewrite: in-flight work must not touch the tree for it. */
  freed = false;
  /** Queued for a write by the journal worker. */
  queued = false;
  lastUse = 0;

  constructor(key: Bkey, level: number, seq: bigint, keys: readonly Bkey[] | KeyList, written: number) {
    this.key = key;
    this.level = level;
    this.seq = seq;
    this.keys = keys instanceof KeyList ? keys : KeyList.from(keys);
    this.written = written;
    this.viewU64s = u64sOf(keys);
  }

  get bucketSector(): number {
    return defined(this.key.ptrs[0], 'a node key has a pointer').offset;
  }

  get dirty(): boolean {
    return this.pending.length > 0;
  }

  get isLeaf(): boolean {
    return this.level === 0;
  }
}

export function u64sOf(keys: readonly Bkey[] | KeyList): number {
  if (keys instanceof KeyList) return keys.u64s();
  let n = 0;
  keys.forEach((k) => (n += bkeyU64s(k)));
  return n;
}

export interface DecodedNode {
  seq: bigint;
  /** Keys of each bset, oldest first. */
  bsets: Bkey[][];
  written: number;
  /** The last bset matched the seq but not its checksum: a torn append. */
  torn: boolean;
}

/**
 * The bsets of a node (bch_btree_node_read_done), with one difference from the
 * kernel: a bset that carries the node's seq but fails its checksum or size
 * check, with no later block carrying the seq, is a torn append, not
 * corruption. For a leaf its keys are still in the journal, so the caller
 * warns and goes on; everything else is an error naming what is wrong.
 */
export function decodeNode(buf: Buffer, nodeKey: Bkey, geo: NodeGeometry): DecodedNode {
  const S = 'btree_node';
  const first = nodeKey.ptrs[0];
  if (!first) throw new FormatError(S, 'key', `the node key ${keyText(nodeKey)} has no pointer`);
  const blockBytes = geo.blockBytes;
  const nodeBlocks = Math.min(geo.nodeBlocks, Math.floor(buf.length / blockBytes));
  const seed = ptrValue(first);
  const magic = bsetMagic(geo.setMagic);
  const where = (block: number): string => `node at sector ${first.offset}, block ${block}`;
  const head = readBsetHeader(buf, 0);
  if (head.seq === 0n) throw new FormatError(S, 'seq', `the first bset has seq 0 at ${where(0)}: not a btree node`);
  const seqAgain = (from: number): boolean => {
    for (let b = from; b < nodeBlocks; b++) if (buf.readBigUInt64LE(b * blockBytes + 16) === head.seq) return true;
    return false;
  };
  const bsets: Bkey[][] = [];
  let written = 0;
  let torn = false;
  while (written < nodeBlocks) {
    const pos = written * blockBytes;
    const h = readBsetHeader(buf, pos);
    if (h.seq !== head.seq) break;
    const blocks = setBlocks(bsetBytes(h.u64s), blockBytes);
    let problem: FormatError | undefined;
    if (h.version > BCACHE_BSET_VERSION) {
      problem = new FormatError(
        S,
        'version',
        `bset version ${h.version} at ${where(written)} is newer than ${BCACHE_BSET_VERSION}`,
      );
    } else if (written + blocks > nodeBlocks) {
      problem = new FormatError(S, 'keys', `bset at ${where(written)} has ${h.u64s} u64s and runs past the node's end`);
    } else if (h.magic !== magic) {
      problem = new FormatError(
        S,
        'magic',
        `bset at ${where(written)} has magic ${hex(h.magic)}, expected ${hex(magic)}`,
      );
    } else {
      const csum = bsetChecksum(buf, pos, h.u64s, h.version, seed);
      if (csum !== h.csum) {
        problem = new FormatError(
          S,
          'csum',
          `bset at ${where(written)} stores ${hex(h.csum)} but checksums to ${hex(csum)}`,
        );
      }
    }
    if (problem) {
      if (written > 0 && problem.field !== 'version' && problem.field !== 'magic' && !seqAgain(written + 1)) {
        torn = true;
        break;
      }
      throw problem;
    }
    if (bsets.length > 0 && h.u64s === 0) {
      throw new FormatError(S, 'keys', `bset at ${where(written)} is empty (only a node's first bset may be)`);
    }
    bsets.push(decodeKeys(buf, pos + BSET_HEADER_BYTES, pos + bsetBytes(h.u64s), 'bset'));
    written += blocks;
  }
  if (!torn && seqAgain(written)) {
    throw new FormatError(
      S,
      'seq',
      `the node's seq appears again after the end of its log (${where(written)}): corrupted btree`,
    );
  }
  return { seq: head.seq, bsets, written, torn };
}

/** Throw unless every key lies at or before the node's own key ("short btree key"). */
function checkWithin(keys: readonly Bkey[], nodeKey: Bkey): void {
  for (const k of keys) {
    if (posCmp(k.inode, k.offset, nodeKey.inode, nodeKey.offset) > 0) {
      throw new FormatError('btree_node', 'keys', `key ${keyText(k)} lies past the node's key ${keyText(nodeKey)}`);
    }
  }
}

/** A leaf key that stands for data (not a hole). */
export function extentLive(k: Bkey): boolean {
  if (k.size === 0 || k.ptrs.length === 0) return false;
  for (const p of k.ptrs) if (!ptrAvailable(p)) return false;
  return true;
}

/**
 * A leaf's merged view from its bsets: later bsets win, then keys that are
 * holes are dropped. A key with pointers outside the cache is corruption (the
 * kernel's "spotted extent"), an error.
 */
export function leafView(bsets: readonly Bkey[][], nodeKey: Bkey, geo: NodeGeometry): Bkey[] {
  // Later bsets win. Overriding is associative, so the sets merge pairwise
  // in rounds (older with the next newer), as merge sort does: a leaf of many
  // bsets costs its keys times log(bsets), not times bsets.
  let sets = bsets.map(normalizeSet);
  while (sets.length > 1) {
    const next: Bkey[][] = [];
    for (let i = 0; i < sets.length; i += 2) {
      const older = sets[i] ?? [];
      const newer = sets[i + 1];
      next.push(newer ? mergeNewer(older, newer) : older);
    }
    sets = next;
  }
  const merged = sets[0] ?? [];
  const view: Bkey[] = [];
  for (const k of merged) {
    if (!extentLive(k)) continue;
    if (extentInvalid(k, geo.cache)) {
      throw new FormatError(
        'btree_node',
        'keys',
        `invalid extent ${keyText(k)}: its pointer leaves the cache's buckets`,
      );
    }
    view.push(k);
  }
  checkWithin(view, nodeKey);
  return view;
}

/**
 * An interior node's view: one child pointer per position. Kernel-written
 * nodes may hold several keys at one position (the older ones made stale by
 * the "freeing keys" at ZERO_KEY that bumped their bucket's gen), so the
 * latest key that is not bad wins; ZERO_KEY positions are dropped.
 */
export function interiorView(
  bsets: readonly Bkey[][],
  nodeKey: Bkey,
  geo: NodeGeometry,
  stale: (k: Bkey) => boolean,
): Bkey[] {
  const all: Array<{ k: Bkey; order: number }> = [];
  let order = 0;
  for (const set of bsets) for (const k of set) all.push({ k, order: order++ });
  all.sort((a, b) => posCmp(a.k.inode, a.k.offset, b.k.inode, b.k.offset) || a.order - b.order);
  const view: Bkey[] = [];
  for (let i = 0; i < all.length;) {
    let j = i;
    let pick: Bkey | undefined;
    const first = defined(all[i], 'i < all.length').k;
    for (; j < all.length; j++) {
      const k = defined(all[j], 'j < all.length').k;
      if (posCmp(k.inode, k.offset, first.inode, first.offset) !== 0) break;
      if (k.inode === 0 && k.offset === 0) continue;
      if (k.ptrs.length === 0 || !k.ptrs.every(ptrAvailable)) continue;
      if (btreePtrInvalid(k, geo.cache)) {
        throw new FormatError('btree_node', 'keys', `invalid btree pointer ${keyText(k)} in an interior node`);
      }
      if (stale(k)) continue;
      pick = k;
    }
    if (pick) view.push(pick);
    i = j;
  }
  checkWithin(view, nodeKey);
  return view;
}

/** The bytes of one bset holding `keys`, padded to whole blocks. */
export function encodeNodeBset(
  keys: readonly Bkey[] | KeyList,
  node: { seq: bigint; key: Bkey },
  geo: NodeGeometry,
): Buffer {
  const first = node.key.ptrs[0];
  if (!first) throw new Error('btree: a node key without a pointer');
  return encodeBset(
    { magic: bsetMagic(geo.setMagic), seq: node.seq, version: BCACHE_BSET_VERSION, keys },
    { seed: ptrValue(first), blockBytes: geo.blockBytes },
  );
}

/** Blocks a bset of `u64s` takes. */
export function bsetBlocks(u64s: number, geo: NodeGeometry): number {
  return setBlocks(bsetBytes(u64s), geo.blockBytes);
}

/** u64s of keys one node can hold in a single bset. */
export function nodeCapacityU64s(geo: NodeGeometry): number {
  return Math.floor((geo.nodeBytes - BSET_HEADER_BYTES) / 8);
}
