// CRC-64/WE, the checksum bcache puts on every metadata structure.
//
// Polynomial 0x42F0E1EBA9EA3693 (ECMA-182), MSB first (not reflected). The
// kernel's bch_crc64() starts from all ones and inverts the result; a btree
// node's bsets instead start from the node's first pointer (btree_csum_set in
// btree.c) and are inverted the same way. Check value of bchCrc64("123456789"):
// 0x62EC59E3F1A4F00A.
//
// Pure TypeScript, slicing-by-8: eight 256-entry tables of 64-bit values, each
// kept as two Uint32Array halves so the inner loop is 32-bit integer arithmetic
// (no BigInt until the end). About 650 MB/s on Node 20 here, plenty for
// metadata (superblocks, journal entries, btree nodes, prio buckets).

const POLY_HI = 0x42f0e1eb;
const POLY_LO = 0xa9ea3693;

/** TABLE_HI[k * 256 + i] / TABLE_LO[...]: byte i followed by k zero bytes. */
const TABLE_HI = new Uint32Array(8 * 256);
const TABLE_LO = new Uint32Array(8 * 256);

function buildTables(): void {
  for (let i = 0; i < 256; i++) {
    let hi = i << 24;
    let lo = 0;
    for (let bit = 0; bit < 8; bit++) {
      const top = hi & 0x80000000;
      hi = ((hi << 1) | (lo >>> 31)) >>> 0;
      lo = (lo << 1) >>> 0;
      if (top !== 0) {
        hi = (hi ^ POLY_HI) >>> 0;
        lo = (lo ^ POLY_LO) >>> 0;
      }
    }
    TABLE_HI[i] = hi;
    TABLE_LO[i] = lo;
  }
  for (let k = 1; k < 8; k++) {
    for (let i = 0; i < 256; i++) {
      const prevHi = TABLE_HI[(k - 1) * 256 + i] ?? 0;
      const prevLo = TABLE_LO[(k - 1) * 256 + i] ?? 0;
      const idx = prevHi >>> 24;
      TABLE_HI[k * 256 + i] = (((prevHi << 8) | (prevLo >>> 24)) ^ (TABLE_HI[idx] ?? 0)) >>> 0;
      TABLE_LO[k * 256 + i] = ((prevLo << 8) ^ (TABLE_LO[idx] ?? 0)) >>> 0;
    }
  }
}
buildTables();

/** The running CRC of the last crc64Raw call, as two halves (avoids an allocation per call). */
let outHi = 0;
let outLo = 0;

/**
 * The kernel's crc64_be(seed, data): no initial or final inversion. Leaves the
 * result in outHi/outLo.
 */
function crc64Raw(seedHi: number, seedLo: number, data: Uint8Array, start: number, end: number): void {
  const th = TABLE_HI;
  const tl = TABLE_LO;
  let hi = seedHi >>> 0;
  let lo = seedLo >>> 0;
  let i = start;
  // DataView's big-endian loads are markedly faster here than assembling bytes.
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  // The non-null assertions below index the 2048-entry tables (every index is
  // a byte plus a multiple of 256) and data within [start, end).
  /* eslint-disable @typescript-eslint/no-non-null-assertion */
  for (; i + 8 <= end; i += 8) {
    const xh = hi ^ dv.getUint32(i);
    const xl = lo ^ dv.getUint32(i + 4);
    const a = 1792 + (xh >>> 24);
    const b = 1536 + ((xh >>> 16) & 0xff);
    const c = 1280 + ((xh >>> 8) & 0xff);
    const d = 1024 + (xh & 0xff);
    const e = 768 + (xl >>> 24);
    const f = 512 + ((xl >>> 16) & 0xff);
    const g = 256 + ((xl >>> 8) & 0xff);
    const h = xl & 0xff;
    hi = th[a]! ^ th[b]! ^ th[c]! ^ th[d]! ^ th[e]! ^ th[f]! ^ th[g]! ^ th[h]!;
    lo = tl[a]! ^ tl[b]! ^ tl[c]! ^ tl[d]! ^ tl[e]! ^ tl[f]! ^ tl[g]! ^ tl[h]!;
  }
  for (; i < end; i++) {
    const idx = ((hi >>> 24) ^ data[i]!) & 0xff;
    hi = ((hi << 8) | (lo >>> 24)) ^ th[idx]!;
    lo = (lo << 8) ^ tl[idx]!;
  }
  /* eslint-enable @typescript-eslint/no-non-null-assertion */
  outHi = hi >>> 0;
  outLo = lo >>> 0;
}

function checkBounds(data: Uint8Array, start: number, end: number): void {
  if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end < start || end > data.length) {
    throw new RangeError(`crc64: range [${start}, ${end}) is outside a buffer of ${data.length} bytes`);
  }
}

function result(): bigint {
  return (BigInt(~outHi >>> 0) << 32n) | BigInt(~outLo >>> 0);
}

/** bch_crc64(): CRC-64/WE of data[start, end) (initial value and final XOR all ones). */
export function bchCrc64(data: Uint8Array, start = 0, end = data.length): bigint {
  checkBounds(data, start, end);
  crc64Raw(0xffffffff, 0xffffffff, data, start, end);
  return result();
}

/**
 * The checksum of a bset in a btree node (btree_csum_set): the same CRC, but
 * started from `seed`, the raw 64-bit value of the node key's first pointer,
 * instead of all ones. The result is inverted as usual.
 */
export function seededCrc64(seed: bigint, data: Uint8Array, start = 0, end = data.length): bigint {
  checkBounds(data, start, end);
  const s = BigInt.asUintN(64, seed);
  crc64Raw(Number(s >> 32n), Number(s & 0xffffffffn), data, start, end);
  return result();
}
