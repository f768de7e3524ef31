// Reusable buffers for READ replies, WRITE payloads and writeback's copies
// from the cache to the backing device. A fresh 1 MiB buffer
// costs an mmap, 256 page faults and a munmap once the GC gets to it, and at
// queue depth 32 the garbage piles up faster than the GC returns it (RSS grew
// past 200 MiB in the 1 MiB benchmarks). Pooled buffers are recycled as soon
// as their reply has been written or their payload stored.
//
// Size classes are powers of two plus a little headroom, so "4 KiB of data
// plus a reply header" fits the 4 KiB class instead of doubling to 8 KiB.

/** Room for a reply header in front of the data. */
const HEADROOM = 64;
const MIN_CLASS = 12; // 4 KiB
const MAX_CLASS = 25; // 32 MiB

export class BufferPool {
  private readonly free: ArrayBuffer[][] = [];
  private readonly owned = new WeakSet<ArrayBuffer>();
  private readonly maxPooledBytes: number;
  private pooledBytes = 0;

  constructor(maxPooledBytes = 32 * 1024 * 1024) {
    this.maxPooledBytes = maxPooledBytes;
    for (let k = 0; k <= MAX_CLASS; k++) this.free.push([]);
  }

  /** Bytes held idle in the pool. */
  get idleBytes(): number {
    return this.pooledBytes;
  }

  /** An uninitialised buffer of exactly `size` bytes; pass it to release() when nobody uses it any more. */
  acquire(size: number): Buffer {
    const k = classOf(size);
    if (k === undefined) return Buffer.allocUnsafe(size);
    const list = this.free[k];
    const ab = list?.pop();
    if (ab) {
      this.pooledBytes -= ab.byteLength;
      return Buffer.from(ab, 0, size);
    }
    const fresh = new ArrayBuffer((1 << k) + HEADROOM);
    this.owned.add(fresh);
    return Buffer.from(fresh, 0, size);
  }

  /**
   * Give a buffer from acquire() back. The caller must not touch it (or any
   * view of it) afterwards. Buffers the pool did not make are ignored.
   */
  release(buf: Buffer): void {
    const ab = buf.buffer;
    if (!(ab instanceof ArrayBuffer) || !this.owned.has(ab)) return;
    if (this.pooledBytes + ab.byteLength > this.maxPooledBytes) return; // let the GC have it
    const k = classOf(ab.byteLength - HEADROOM);
    if (k === undefined) return;
    this.free[k]?.push(ab);
    this.pooledBytes += ab.byteLength;
  }
}

function classOf(size: number): number | undefined {
  if (size <= (1 << MIN_CLASS) >> 1) return undefined; // small: Node's own slab allocator does well
  const k = Math.max(MIN_CLASS, Math.ceil(Math.log2(Math.max(1, size - HEADROOM))));
  return k <= MAX_CLASS ? k : undefined;
}

/** The pool shared by every connection and writeback of the process. */
export const ioBuffers = new BufferPool();
