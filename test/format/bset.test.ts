import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { makeKey, makePtr, MAX_KEY_OFFSET, ptrValue, type Bkey } from '../../src/format/bkey.ts';
import {
  bsetBytes,
  bsetChecksum,
  bsetMagic,
  decodeBtreeNode,
  encodeBset,
  readBsetHeader,
  setBlocks,
} from '../../src/format/bset.ts';
import { BSET_MAGIC } from '../../src/format/constants.ts';
import { bchCrc64, seededCrc64 } from '../../src/format/crc64.ts';
import { FormatError } from '../../src/format/errors.ts';

const SET_MAGIC = 0x4d2d1e1e0f0f0f0fn;
const SEQ = 0x1234567890abcdefn;
const BLOCK = 1; // sectors
const NODE_SECTORS = 16;
const nodeKey = makeKey(0xfffff, MAX_KEY_OFFSET, NODE_SECTORS, false, [makePtr(0, 2688, 1)]);
const seed = ptrValue(nodeKey.ptrs[0] ?? makePtr(0, 0, 0));
const g = { bucketSize: 128, firstBucket: 1, nbuckets: 1024 };

function leaf(n: number, from = 0): Bkey[] {
  return Array.from({ length: n }, (_, i) =>
    makeKey(0, 16 + 8 * (from + i) + 8, 8, i % 2 === 0, [makePtr(0, 3000 + 8 * (from + i), 1)]),
  );
}

/** A node image: bsets appended block after block, the rest of the bucket as given. */
function node(
  bsets: Array<{ keys: Bkey[]; seq?: bigint; version?: number }>,
  fill = 0,
): { buf: Buffer; blocks: number[] } {
  const buf = Buffer.alloc(NODE_SECTORS * 512, fill);
  const blocks: number[] = [];
  let block = 0;
  for (const b of bsets) {
    const enc = encodeBset(
      { magic: bsetMagic(SET_MAGIC), seq: b.seq ?? SEQ, version: b.version ?? 1, keys: b.keys },
      { seed, blockBytes: BLOCK * 512 },
    );
    enc.copy(buf, block * 512);
    blocks.push(block);
    block += enc.length / 512;
  }
  return { buf, blocks };
}

function decode(buf: Buffer) {
  return decodeBtreeNode(buf, { nodeKey, setMagic: SET_MAGIC, blockSize: BLOCK, geometry: g, level: 0 });
}

function corrupt(field: string, pattern: RegExp, buf: Buffer): void {
  assert.throws(
    () => decode(buf),
    (e: unknown) =>
      e instanceof FormatError && e.structure === 'btree_node' && e.field === field && pattern.test(e.message),
    `btree_node.${field} ~ ${pattern}`,
  );
}

test('a bset is checksummed with the node pointer as seed, from byte 8 to the end of its keys', () => {
  const keys = leaf(3);
  const enc = encodeBset({ magic: bsetMagic(SET_MAGIC), seq: SEQ, version: 1, keys }, { seed, blockBytes: 512 });
  assert.equal(enc.length, 512);
  const h = readBsetHeader(enc, 0);
  assert.deepEqual([h.magic, h.seq, h.version, h.u64s], [SET_MAGIC ^ BSET_MAGIC, SEQ, 1, 9]);
  assert.equal(h.csum, seededCrc64(seed, enc, 8, bsetBytes(9)));
  assert.notEqual(h.csum, bchCrc64(enc, 8, bsetBytes(9)), 'not the plain CRC');
  const v0 = encodeBset({ magic: bsetMagic(SET_MAGIC), seq: SEQ, version: 0, keys }, { seed, blockBytes: 512 });
  assert.equal(readBsetHeader(v0, 0).csum, bchCrc64(v0, 8, bsetBytes(9)), 'version 0 used the plain CRC');
  assert.equal(bsetChecksum(v0, 0, 9, 0, seed), bchCrc64(v0, 8, bsetBytes(9)));
  assert.equal(setBlocks(bsetBytes(9), 512), 1);
  assert.equal(setBlocks(bsetBytes(60), 512), 1);
  assert.equal(setBlocks(bsetBytes(61), 512), 2);
});

test('a node log decodes bset by bset and tells where the next one goes', () => {
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: 30 }), { minLength: 1, maxLength: 4 }), (sizes) => {
      let from = 0;
      const bsets = [{ keys: [] as Bkey[] }, ...sizes.map((n) => ({ keys: leaf(n, (from += n) - n) }))];
      const { buf, blocks } = node(bsets, 0x5c);
      const n = decode(buf);
      assert.equal(n.seq, SEQ);
      assert.deepEqual(
        n.bsets.map((b) => b.block),
        blocks,
      );
      assert.deepEqual(
        n.bsets.map((b) => b.keys),
        bsets.map((b) => b.keys),
      );
      const last = n.bsets[n.bsets.length - 1];
      assert.ok(last);
      assert.equal(n.writtenBlocks, last.block + setBlocks(bsetBytes(3 * last.keys.length), 512));
    }),
    { numRuns: 50 },
  );
});

test('a different seq ends the log (stale bytes of the bucket), wherever it is', () => {
  const { buf } = node([{ keys: [] }, { keys: leaf(2) }, { keys: leaf(2, 2), seq: SEQ + 1n }]);
  const n = decode(buf);
  assert.equal(n.bsets.length, 2);
  assert.equal(n.writtenBlocks, 2);
});

test('corruption inside the log is an error, not the end of it', () => {
  const good = node([{ keys: [] }, { keys: leaf(4) }]);
  const at = (good.blocks[1] ?? 0) * 512;
  const flip = (pos: number): Buffer => {
    const b = Buffer.from(good.buf);
    b[pos] = (b[pos] ?? 0) ^ 1;
    return b;
  };
  corrupt('csum', /stores 0x[0-9a-f]+ but checksums to/, flip(at + 40));
  corrupt('magic', /expected/, flip(at + 8));
  const v2 = Buffer.from(good.buf);
  v2.writeUInt32LE(2, at + 24);
  corrupt('version', /newer than 1/, v2);
  const long = Buffer.from(good.buf);
  long.writeUInt32LE(100000, at + 28);
  corrupt('keys', /runs past the node's end/, long);
  corrupt('keys', /empty/, node([{ keys: [] }, { keys: [] }]).buf);
  corrupt('seq', /not a btree node/, Buffer.alloc(NODE_SECTORS * 512));
  // The node's seq again after the end of its log: an overwritten tail, not stale data.
  const again = node([{ keys: [] }, { keys: leaf(2) }, { keys: leaf(1, 2), seq: 7n }]).buf;
  again.writeBigUInt64LE(SEQ, 10 * 512 + 16);
  corrupt('seq', /corrupted btree/, again);
});

test('a key past the node key is refused ("short btree key"); checks need the node key to have a pointer', () => {
  const small = makeKey(0, 30, NODE_SECTORS, false, [makePtr(0, 2688, 1)]);
  const { buf } = node([{ keys: leaf(3) }]);
  assert.throws(
    () => decodeBtreeNode(buf, { nodeKey: small, setMagic: SET_MAGIC, blockSize: BLOCK, geometry: g }),
    /short btree key/,
  );
  assert.throws(
    () => decodeBtreeNode(buf, { nodeKey: makeKey(0, 40, 16), setMagic: SET_MAGIC, blockSize: BLOCK }),
    /has no pointer/,
  );
  assert.throws(
    () => decodeBtreeNode(buf.subarray(0, 1024), { nodeKey, setMagic: SET_MAGIC, blockSize: BLOCK }),
    /btree_node\.size/,
  );
  assert.throws(
    () => decodeBtreeNode(buf, { nodeKey: { ...nodeKey, size: 12 }, setMagic: SET_MAGIC, blockSize: 8 }),
    /whole number of blocks/,
  );
});
