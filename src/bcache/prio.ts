// The prio/gen buckets (super.c bch_prio_write, prio_read): every bucket's
// priority and generation, packed 3 bytes each into a chain of buckets that
// the journal points at (jset.prio_bucket[0] is the first).
//
// Writing (R3): fresh buckets from the prio reserve are filled last to first
// so each names the next; all are written, then flushed; only then does the
// chain become the current one (so a journal entry written from then on
// points at a durable chain) and an R1 journal commit records it. The
// previous chain is freed after that commit, as the kernel does.
//
// Reading: a bad checksum or magic is warned about and the entries are used
// anyway, exactly as the kernel does ("bad csum reading priorities"); a chain
// that leaves the cache's buckets is an error.

import { metaBucketBytes, PRIO_ENTRY_BYTES, PRIO_SET_HEADER_BYTES, priosPerBucket } from '../format/constants.ts';
import { bchCrc64 } from '../format/crc64.ts';
import { FormatError } from '../format/errors.ts';
import { encodePrioBucket, psetMagic } from '../format/prio.ts';
import { allDone } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { RESERVE_PRIO, type Allocator } from './alloc.ts';
import type { Buckets } from './buckets.ts';
import type { CacheIo } from './io.ts';

export interface PrioHost {
  io: CacheIo;
  buckets: Buckets;
  allocator: Allocator;
  setMagic: bigint;
  /** The R1 commit that records the new first bucket. */
  commitJournal(): Promise<void>;
}

export class Prios {
  private readonly host: PrioHost;
  readonly count: number;
  readonly perBucket: number;
  private readonly bytes: number;
  /** The current chain (prio_buckets). */
  current: number[];
  /** The chain before it, freed after the next write is journaled (prio_last_buckets). */
  last: number[];
  seq = 0;

  constructor(host: PrioHost) {
    this.host = host;
    const b = host.buckets;
    this.perBucket = priosPerBucket(b.bucketSize);
    this.count = Math.ceil(b.nbuckets / this.perBucket);
    this.bytes = metaBucketBytes(b.bucketSize);
    this.current = new Array<number>(this.count).fill(0);
    this.last = new Array<number>(this.count).fill(0);
  }

  /** The first bucket of the chain, as the journal records it. */
  get first(): number {
    return this.current[0] ?? 0;
  }

  async write(): Promise<void> {
    const { io, buckets: b, allocator } = this.host;
    const fresh: number[] = [];
    try {
      for (let i = 0; i < this.count; i++) {
        const r = allocator.allocNow(RESERVE_PRIO);
        if (r < 0) throw new Error(`prio write: the prio reserve holds ${i} of the ${this.count} buckets it needs`);
        fresh.push(r);
      }
    } catch (err) {
      for (const r of fresh) allocator.unalloc(r, RESERVE_PRIO);
      throw err;
    }
    this.seq++;
    const writes: Array<Promise<void>> = [];
    for (let i = this.count - 1; i >= 0; i--) {
      const prios = new Uint16Array(this.perBucket);
      const gens = new Uint8Array(this.perBucket);
      const from = i * this.perBucket;
      const n = Math.min(this.perBucket, b.nbuckets - from);
      prios.set(b.prio.subarray(from, from + n));
      gens.set(b.gen.subarray(from, from + n));
      const buf = encodePrioBucket(
        { seq: this.seq, version: 0, pad: 0, nextBucket: fresh[i + 1] ?? 0, prios, gens },
        { setMagic: this.host.setMagic, bucketSize: b.bucketSize },
      );
      writes.push(io.writeMeta(buf, b.sector(fresh[i] ?? 0)));
    }
    await allDone(writes);
    await io.flush();
    this.current = fresh;
    for (const r of fresh) b.unpinBucket(r);
    await this.host.commitJournal();
    for (const old of this.last) if (old) allocator.freeBucket(old);
    this.last = fresh.slice();
  }

  /** prio_read(): load gens and prios from the chain starting at `first`. */
  async read(first: number): Promise<void> {
    const { io, buckets: b } = this.host;
    const buf = Buffer.allocUnsafe(this.bytes);
    const magic = psetMagic(this.host.setMagic);
    let bucket = first;
    for (let i = 0; i < this.count; i++) {
      if (bucket < b.firstBucket || bucket >= b.nbuckets) {
        throw new FormatError(
          'prio_set',
          'next_bucket',
          `prio bucket ${i} of ${this.count} would be bucket ${bucket}, outside the cache's buckets ${b.firstBucket}-${b.nbuckets - 1}`,
        );
      }
      await io.read(buf, b.sector(bucket));
      this.current[i] = bucket;
      this.last[i] = bucket;
      if (buf.readBigUInt64LE(0) !== bchCrc64(buf, 8, this.bytes))
        log.warn('bcache: prio_read() bad csum reading priorities');
      if (buf.readBigUInt64LE(8) !== magic) log.warn('bcache: prio_read() bad magic reading priorities');
      this.seq = Number(buf.readBigUInt64LE(16) & 0xfffffffffffffn);
      const from = i * this.perBucket;
      const n = Math.min(this.perBucket, b.nbuckets - from);
      for (let j = 0, at = PRIO_SET_HEADER_BYTES; j < n; j++, at += PRIO_ENTRY_BYTES) {
        b.prio[from + j] = buf.readUInt16LE(at);
        const gen = buf.readUInt8(at + 2);
        b.gen[from + j] = gen;
        b.lastGc[from + j] = gen;
      }
      bucket = Number(buf.readBigUInt64LE(32) & 0xfffffffffffffn);
    }
  }
}
