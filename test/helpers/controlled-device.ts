// A BlockDevice wrapper the test drives: it can hold every operation at a gate
// until released (to create requests in flight deterministically), fail chosen
// operations with a chosen errno, and it counts what reached the device.

import type { BlockDevice, BlockDeviceCaps, Extent, WriteOptions, ZeroOptions } from '../../src/blockdev/types.ts';
import { deferred, type Deferred } from '../../src/util/lifecycle.ts';

export type Op = 'read' | 'write' | 'flush' | 'discard' | 'writeZeroes' | 'blockStatus' | 'close';

class CodedError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

export class ControlledDevice implements BlockDevice {
  readonly inner: BlockDevice;
  readonly caps: BlockDeviceCaps;
  /** Operations that reached the device, in order. */
  readonly log: { op: Op; offset: number; length: number; options?: WriteOptions | ZeroOptions }[] = [];
  /** Fail these operations with this errno code (a string, as Node's fs errors carry). */
  readonly failures = new Map<Op, string>();
  inflight = 0;
  maxInflight = 0;
  closed = false;
  private gates: { match: (op: Op, offset: number) => boolean; gate: Deferred<void> }[] = [];
  private readonly startWaiters: { n: number; resolve: () => void }[] = [];

  constructor(inner: BlockDevice, caps: Partial<BlockDeviceCaps> = {}) {
    this.inner = inner;
    this.caps = { ...inner.caps, ...caps };
  }

  get name(): string {
    return `controlled:${this.inner.name}`;
  }
  get size(): number {
    return this.inner.size;
  }
  get logicalBlockSize(): number {
    return this.inner.logicalBlockSize;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  /**
   * Hold every operation that starts from now on and matches `match` (all, by
   * default) until the returned function (or release()) is called.
   */
  hold(match: (op: Op, offset: number) => boolean = () => true): () => void {
    const entry = { match, gate: deferred() };
    this.gates.push(entry);
    return () => {
      this.gates = this.gates.filter((g) => g !== entry);
      entry.gate.resolve();
    };
  }

  /** Release every hold. */
  release(): void {
    const gates = this.gates;
    this.gates = [];
    for (const g of gates) g.gate.resolve();
  }

  /** Resolves once `n` operations in total have reached the device. */
  started(n: number): Promise<void> {
    if (this.log.length >= n) return Promise.resolve();
    return new Promise((resolve) => this.startWaiters.push({ n, resolve }));
  }

  private async run<T>(
    op: Op,
    offset: number,
    length: number,
    fn: () => Promise<T>,
    options?: WriteOptions | ZeroOptions,
  ): Promise<T> {
    this.log.push(options ? { op, offset, length, options } : { op, offset, length });
    for (const w of this.startWaiters.filter((x) => this.log.length >= x.n)) {
      this.startWaiters.splice(this.startWaiters.indexOf(w), 1);
      w.resolve();
    }
    this.inflight++;
    this.maxInflight = Math.max(this.maxInflight, this.inflight);
    try {
      for (const g of this.gates.filter((x) => x.match(op, offset))) await g.gate.promise;
      const code = this.failures.get(op);
      if (code !== undefined) throw new CodedError(code, `${op} failed by test (${code})`);
      return await fn();
    } finally {
      this.inflight--;
    }
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.run('read', offset, buf.length, () => this.inner.read(buf, offset));
  }
  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    return this.run('write', offset, buf.length, () => this.inner.write(buf, offset, options), options);
  }
  flush(): Promise<void> {
    return this.run('flush', 0, 0, () => this.inner.flush());
  }
  discard(offset: number, length: number): Promise<void> {
    return this.run('discard', offset, length, () => this.inner.discard(offset, length));
  }
  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.run('writeZeroes', offset, length, () => this.inner.writeZeroes(offset, length, options), options);
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.run('blockStatus', offset, length, () => this.inner.blockStatus(offset, length));
  }
  async close(): Promise<void> {
    this.closed = true;
    await this.inner.close();
  }
}
