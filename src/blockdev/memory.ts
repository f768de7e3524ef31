// A BlockDevice held in memory: for tests, demos and as the base of the
// crashable device. Storage is allocated lazily in 64 KiB chunks, so a large
// sparse device costs only what is written; unwritten chunks are holes.

import { rejectWith } from '../util/lifecycle.ts';
import {
  checkRange,
  IoError,
  type BlockDevice,
  type BlockDeviceCaps,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from './types.ts';

const CHUNK = 64 * 1024;

/** Run a synchronous operation, turning a throw into a rejected promise. */
function settle<T>(fn: () => T): Promise<T> {
  try {
    return Promise.resolve(fn());
  } catch (err) {
    return rejectWith(err);
  }
}

export interface MemoryDeviceOptions {
  name?: string;
  readOnly?: boolean;
  logicalBlockSize?: number;
}

export class MemoryBlockDevice implements BlockDevice {
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly caps: BlockDeviceCaps = { discard: true, fastZero: true, blockStatus: true, rotational: false };
  private readonly chunks = new Map<number, Buffer>();
  private closed = false;

  constructor(size: number, options: MemoryDeviceOptions = {}) {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`memory device: bad size ${size}`);
    this.size = size;
    this.name = options.name ?? `memory:${size}`;
    this.readOnly = options.readOnly ?? false;
    this.logicalBlockSize = options.logicalBlockSize ?? 512;
  }

  private live(): void {
    if (this.closed) throw new IoError('ESHUTDOWN', `${this.name}: device is closed`);
  }

  private writable(offset: number, length: number): void {
    this.live();
    if (this.readOnly) throw new IoError('EPERM', `${this.name}: device is read-only`);
    checkRange(this, offset, length, true);
  }

  /** Synchronous read, for tests and for devices layered on this one. */
  readSync(buf: Buffer, offset: number): void {
    this.live();
    checkRange(this, offset, buf.length);
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const within = pos - index * CHUNK;
      const n = Math.min(CHUNK - within, buf.length - done);
      const chunk = this.chunks.get(index);
      if (chunk) chunk.copy(buf, done, within, within + n);
      else buf.fill(0, done, done + n);
      done += n;
    }
  }

  /** Synchronous write, for tests and for devices layered on this one. */
  writeSync(buf: Buffer, offset: number): void {
    this.writable(offset, buf.length);
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const within = pos - index * CHUNK;
      const n = Math.min(CHUNK - within, buf.length - done);
      let chunk = this.chunks.get(index);
      if (!chunk) {
        chunk = Buffer.alloc(CHUNK);
        this.chunks.set(index, chunk);
      }
      buf.copy(chunk, within, done, done + n);
      done += n;
    }
  }

  /** Zero (and, where a whole chunk is covered and holes are allowed, release) a range. */
  zeroSync(offset: number, length: number, punch: boolean): void {
    this.writable(offset, length);
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const within = pos - index * CHUNK;
      const n = Math.min(CHUNK - within, length - done);
      const chunk = this.chunks.get(index);
      if (chunk) {
        if (punch && n === CHUNK) this.chunks.delete(index);
        else chunk.fill(0, within, within + n);
      }
      done += n;
    }
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return settle(() => {
      this.readSync(buf, offset);
    });
  }

  readNow(buf: Buffer, offset: number): boolean {
    try {
      this.readSync(buf, offset);
      return true;
    } catch {
      return false; // read() reports it
    }
  }

  write(buf: Buffer, offset: number, _options?: WriteOptions): Promise<void> {
    return settle(() => {
      this.writeSync(buf, offset);
    });
  }

  flush(): Promise<void> {
    return settle(() => {
      this.live();
    });
  }

  discard(offset: number, length: number): Promise<void> {
    return settle(() => {
      this.zeroSync(offset, length, true);
    });
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return settle(() => {
      this.zeroSync(offset, length, options?.noHole !== true);
    });
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return settle(() => {
      this.live();
      checkRange(this, offset, length);
      const out: Extent[] = [];
      let pos = offset;
      const end = offset + length;
      while (pos < end) {
        const index = Math.floor(pos / CHUNK);
        const n = Math.min((index + 1) * CHUNK, end) - pos;
        const hole = !this.chunks.has(index);
        const last = out[out.length - 1];
        if (last && last.hole === hole) last.length += n;
        else out.push({ length: n, hole, zero: hole });
        pos += n;
      }
      return out;
    });
  }

  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }

  /** An independent copy with the same contents (holes stay holes), open even if this one is closed. */
  clone(options: MemoryDeviceOptions = {}): MemoryBlockDevice {
    const copy = new MemoryBlockDevice(this.size, {
      name: options.name ?? this.name,
      readOnly: options.readOnly ?? this.readOnly,
      logicalBlockSize: options.logicalBlockSize ?? this.logicalBlockSize,
    });
    for (const [index, chunk] of this.chunks) copy.chunks.set(index, Buffer.from(chunk));
    return copy;
  }

  /** Bytes of storage actually allocated. */
  get allocatedBytes(): number {
    return this.chunks.size * CHUNK;
  }
}
