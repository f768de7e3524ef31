// A bounded FIFO of bucket numbers (the kernel's DECLARE_FIFO): the free
// lists and free_inc. A ring over an Int32Array, so pushing and popping never
// allocate and the capacity is exactly what the kernel would size.

export class Fifo {
  readonly capacity: number;
  private readonly data: Int32Array;
  private head = 0;
  private count = 0;

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 0) throw new RangeError(`fifo: bad capacity ${capacity}`);
    this.capacity = capacity;
    this.data = new Int32Array(Math.max(1, capacity));
  }

  get length(): number {
    return this.count;
  }

  get full(): boolean {
    return this.count >= this.capacity;
  }

  get empty(): boolean {
    return this.count === 0;
  }

  /** Append at the back; false if full. */
  push(v: number): boolean {
    if (this.count >= this.capacity) return false;
    this.data[(this.head + this.count) % this.data.length] = v;
    this.count++;
    return true;
  }

  /** Put back at the front (an allocation that was not used); false if full. */
  unshift(v: number): boolean {
    if (this.count >= this.capacity) return false;
    this.head = (this.head - 1 + this.data.length) % this.data.length;
    this.data[this.head] = v;
    this.count++;
    return true;
  }

  /** Take from the front, or -1 if empty. */
  pop(): number {
    if (this.count === 0) return -1;
    const v = this.data[this.head] ?? -1;
    this.head = (this.head + 1) % this.data.length;
    this.count--;
    return v;
  }

  includes(v: number): boolean {
    for (let i = 0; i < this.count; i++) if (this.data[(this.head + i) % this.data.length] === v) return true;
    return false;
  }

  toArray(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.count; i++) out.push(this.data[(this.head + i) % this.data.length] ?? -1);
    return out;
  }

  clear(): void {
    this.head = 0;
    this.count = 0;
  }
}
