// A memory device whose completions arrive as io_uring's do, for the
// benchmarks that drive the engine in-process (engine-micro.ts,
// admission-engine.ts). Types only from src/: the benchmarks load the engine
// itself from dist/ (engine-micro.ts says why).

import type { BlockDevice, BlockDeviceCaps, Extent, WriteOptions, ZeroOptions } from '../src/blockdev/types.ts';
import type { MemoryBlockDevice } from '../src/blockdev/memory.ts';

/**
 * A memory device whose operations complete on a later event-loop turn, in
 * batches, as io_uring completions do: with plain memory devices every request
 * would run start to end in one chain of microtasks, and nothing that waits
 * for a macrotask (GC slices, timers) would run during the measurement.
 */
export class LoopDevice implements BlockDevice {
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly = false;
  readonly caps: BlockDeviceCaps;
  private readonly inner: MemoryBlockDevice;
  private batch: Array<() => void> = [];

  constructor(inner: MemoryBlockDevice) {
    this.inner = inner;
    this.name = inner.name;
    this.size = inner.size;
    this.logicalBlockSize = inner.logicalBlockSize;
    this.caps = inner.caps;
  }

  private later<T>(fn: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      if (this.batch.length === 0) {
        setImmediate(() => {
          const run = this.batch;
          this.batch = [];
          for (const f of run) f();
        });
      }
      this.batch.push(() => {
        fn().then(resolve, reject);
      });
    });
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.later(() => this.inner.read(buf, offset));
  }
  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    return this.later(() => this.inner.write(buf, offset, options));
  }
  flush(): Promise<void> {
    return this.later(() => this.inner.flush());
  }
  discard(offset: number, length: number): Promise<void> {
    return this.later(() => this.inner.discard(offset, length));
  }
  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.later(() => this.inner.writeZeroes(offset, length, options));
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
