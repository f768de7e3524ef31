// The writes a server acknowledged since the last completed FLUSH, kept by
// the client so that it can send them again after a reconnect (client.ts,
// "Durability across a reconnect").
//
// An acknowledged write is not durable until a FLUSH covers it: the server
// may hold it in a volatile cache (its own, or the page cache of a machine
// that then reboots). If the connection is lost because the server
// restarted, those writes may be gone although our callers were told they
// were done. Keeping them until a FLUSH and re-sending them after the
// reconnect makes the server's state again what the callers were told it is.
//
// The log is kept in acknowledgement order, as the writes came, and is
// folded into the newest content per range only when it is replayed (after a
// reconnect: rare). Every acknowledged write passes through here, so adding
// must cost next to nothing: an append, and a copy of the data into a slab
// (a fresh 4 KiB Buffer per write cost ~5 µs in allocation and GC; a sorted
// array spliced on every write moved thousands of slots). A FLUSH covers
// everything acknowledged before it was sent, which is a prefix of the log,
// so dropping is cutting the front. A FUA write is durable on acknowledgement:
// it appends a "clear" of its range, which at the fold removes the older
// content it overwrote. An overwritten range is held twice until a FLUSH
// drops it; the client's bound on held bytes (client.ts) counts both.

export type UnflushedKind = 'data' | 'zero' | 'trim';

export interface UnflushedExtent {
  start: number;
  end: number;
  kind: UnflushedKind;
  /** 'data': exactly end - start bytes, owned by the log. */
  data: Buffer | undefined;
  /** 'zero': the range must stay allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole: boolean;
  /** When the server acknowledged it (the client's acknowledgement counter). */
  seq: number;
}

/** Data up to this size is copied into a shared slab; larger writes get their own buffer. */
const SLAB_PIECE_MAX = 64 * 1024;
const SLAB_BYTES = 1024 * 1024;
/**
 * Slabs the log's flushed front gave back are kept for reuse up to this many:
 * copying into fresh memory costs a page fault per 4 KiB (10-13 µs a page on
 * the development VM, docs/performance.md), copying into a reused slab does
 * not.
 */
const SLABS_KEPT = 32;

/** Entry kinds as stored; 'clear': a FUA write made the range durable, nothing older in it is replayed. */
const KIND_DATA = 0;
const KIND_ZERO = 1;
const KIND_TRIM = 2;
const KIND_CLEAR = 3;
const KIND_NAMES: readonly UnflushedKind[] = ['data', 'zero', 'trim'];
/** dataAt for an entry without data in a slab: none at all (-1), or a buffer of its own in `own` (-2). */
const NO_DATA = -1;
const OWN_DATA = -2;

/**
 * The log is struct-of-arrays: one slot per entry in typed arrays, no object
 * per write. Entries live for seconds (until a FLUSH), so objects would
 * survive two scavenges each and be copied into the old generation: tens of
 * thousands a second, the cost that made the log show in the proxy's profile.
 */
export class UnflushedLog {
  // Slots [head, tail) are live, in acknowledgement order (seq never decreases).
  private cap = 1024;
  private starts = new Float64Array(this.cap);
  private ends = new Float64Array(this.cap);
  private seqs = new Float64Array(this.cap);
  private kinds = new Uint8Array(this.cap);
  private noHoles = new Uint8Array(this.cap);
  /** Slab number of the entry's data (see `slabBase`), or NO_DATA / OWN_DATA. */
  private slabNos = new Float64Array(this.cap);
  private dataAt = new Int32Array(this.cap);
  /** Data of writes larger than a slab piece, by slot. */
  private own = new Map<number, Buffer>();
  private head = 0;
  private tail = 0;
  /** Bytes of data held (zero, trim and clear entries hold none). */
  private held = 0;
  private lastSeq = 0;
  private slabUsed = 0;
  /** Slabs holding live entries' data, oldest first (the last is the one being filled); the first is number `slabBase`. */
  private slabsInUse: Buffer[] = [];
  private slabBase = 0;
  private slabsFree: Buffer[] = [];

  get bytes(): number {
    return this.held;
  }

  /** Entries held (an overwritten range counts once per write until a FLUSH drops it). */
  get size(): number {
    return this.tail - this.head;
  }

  /** Record acknowledged data; `data` is copied, so the caller keeps its buffer. */
  putData(start: number, data: Buffer, seq: number): void {
    const n = data.length;
    if (n === 0) return;
    const i = this.append(start, start + n, KIND_DATA, false, seq);
    if (n > SLAB_PIECE_MAX) {
      this.own.set(i, Buffer.from(data));
      this.slabNos[i] = OWN_DATA;
    } else {
      let slab = this.slabsInUse[this.slabsInUse.length - 1];
      if (slab === undefined || this.slabUsed + n > slab.length) {
        slab = this.slabsFree.pop() ?? Buffer.allocUnsafeSlow(SLAB_BYTES);
        this.slabsInUse.push(slab);
        this.slabUsed = 0;
      }
      data.copy(slab, this.slabUsed);
      this.slabNos[i] = this.slabBase + this.slabsInUse.length - 1;
      this.dataAt[i] = this.slabUsed;
      // Keep pieces 8-byte aligned, as Node's own pool does.
      this.slabUsed += (n + 7) & ~7;
    }
    this.held += n;
  }

  putZero(start: number, length: number, noHole: boolean, seq: number): void {
    if (length > 0) this.append(start, start + length, KIND_ZERO, noHole, seq);
  }

  putTrim(start: number, length: number, seq: number): void {
    if (length > 0) this.append(start, start + length, KIND_TRIM, false, seq);
  }

  /** The range is durable (a FUA write): nothing older in it needs replaying. */
  clear(start: number, length: number): void {
    if (this.size === 0 || length <= 0) return;
    this.append(start, start + length, KIND_CLEAR, false, this.lastSeq);
  }

  /** A FLUSH sent after acknowledgement `mark` completed: everything acknowledged up to it is durable. */
  dropUpTo(mark: number): void {
    let h = this.head;
    while (h < this.tail && (this.seqs[h] as number) <= mark) {
      if (this.kinds[h] === KIND_DATA) this.held -= (this.ends[h] as number) - (this.starts[h] as number);
      if (this.slabNos[h] === OWN_DATA) this.own.delete(h);
      h++;
    }
    this.head = h;
    this.recycleSlabs();
    if (this.head === this.tail) {
      this.head = 0;
      this.tail = 0;
    }
  }

  /**
   * The newest content of every range, sorted by start and not overlapping,
   * to replay (any order gives the same result). Data are copies: the log
   * reuses its slabs once a FLUSH drops what they held.
   *
   * One sweep over the entries' edges in address order, with the entries
   * covering the current address in a heap by slot (a later slot is a newer
   * entry): each stretch between two edges belongs to the newest entry over
   * it, and a 'clear' there means nothing to replay. O(n log n), so a log of
   * a hundred thousand small writes folds in a fraction of a second; the
   * interval map spliced per entry that this replaced took 6 s for 131k
   * writes of 512 bytes, all of it on the event loop at a reconnect.
   */
  snapshot(): readonly UnflushedExtent[] {
    const head = this.head;
    const n = this.tail - head;
    if (n === 0) return [];
    const starts = this.starts;
    const ends = this.ends;
    const byStart = new Int32Array(n);
    const byEnd = new Int32Array(n);
    for (let k = 0; k < n; k++) {
      byStart[k] = head + k;
      byEnd[k] = head + k;
    }
    byStart.sort((a, b) => (starts[a] as number) - (starts[b] as number));
    byEnd.sort((a, b) => (ends[a] as number) - (ends[b] as number));
    const ended = new Uint8Array(n);
    const heap = new SlotHeap(n);
    // The visible pieces, as (slot, start, end); a piece continuing the last one of its slot extends it.
    const pieceSlot: number[] = [];
    const pieceStart: number[] = [];
    const pieceEnd: number[] = [];
    let si = 0;
    let ei = 0;
    let x = starts[byStart[0] as number] as number;
    for (;;) {
      while (si < n && starts[byStart[si] as number] === x) heap.push(byStart[si++] as number);
      while (ei < n && ends[byEnd[ei] as number] === x) ended[(byEnd[ei++] as number) - head] = 1;
      while (heap.size > 0 && ended[heap.top - head] === 1) heap.pop();
      const nextStart = si < n ? (starts[byStart[si] as number] as number) : Infinity;
      const nextEnd = ei < n ? (ends[byEnd[ei] as number] as number) : Infinity;
      const next = Math.min(nextStart, nextEnd);
      if (next === Infinity) break;
      if (heap.size > 0 && this.kinds[heap.top] !== KIND_CLEAR) {
        const slot = heap.top;
        const last = pieceSlot.length - 1;
        if (last >= 0 && pieceSlot[last] === slot && pieceEnd[last] === x) pieceEnd[last] = next;
        else {
          pieceSlot.push(slot);
          pieceStart.push(x);
          pieceEnd.push(next);
        }
      }
      x = next;
    }
    // The data of every piece copied into one buffer: one allocation, not one per extent.
    let dataBytes = 0;
    for (let k = 0; k < pieceSlot.length; k++) {
      if (this.kinds[pieceSlot[k] as number] === KIND_DATA)
        dataBytes += (pieceEnd[k] as number) - (pieceStart[k] as number);
    }
    const copies = Buffer.allocUnsafeSlow(dataBytes);
    let copied = 0;
    const out: UnflushedExtent[] = [];
    for (let k = 0; k < pieceSlot.length; k++) {
      const i = pieceSlot[k] as number;
      const start = pieceStart[k] as number;
      const end = pieceEnd[k] as number;
      const kind = this.kinds[i] as number;
      let data: Buffer | undefined;
      if (kind === KIND_DATA) {
        const from = start - (starts[i] as number);
        const source = this.dataOf(i);
        if (source) {
          source.copy(copies, copied, from, from + end - start);
          data = copies.subarray(copied, copied + end - start);
          copied += end - start;
        }
      }
      out.push({
        start,
        end,
        kind: KIND_NAMES[kind] ?? 'data',
        data,
        noHole: this.noHoles[i] === 1,
        seq: this.seqs[i] as number,
      });
    }
    return out;
  }

  /** A view of slot i's data (valid until a FLUSH drops it). */
  private dataOf(i: number): Buffer | undefined {
    const no = this.slabNos[i] as number;
    if (no === OWN_DATA) return this.own.get(i);
    if (no === NO_DATA) return undefined;
    const slab = this.slabsInUse[no - this.slabBase];
    const at = this.dataAt[i] as number;
    const n = (this.ends[i] as number) - (this.starts[i] as number);
    return slab?.subarray(at, at + n);
  }

  /**
   * Slabs older than the one holding the first live entry's slab data hold
   * nothing live (entries fill slabs in log order). With no live slab data at
   * all, every slab is free (the one being filled too).
   */
  private recycleSlabs(): void {
    let firstLive = this.slabBase + this.slabsInUse.length;
    for (let i = this.head; i < this.tail; i++) {
      const no = this.slabNos[i] as number;
      if (no >= 0) {
        firstLive = no;
        break;
      }
    }
    const drop = firstLive - this.slabBase;
    if (drop <= 0) return;
    for (let k = 0; k < drop; k++) {
      const slab = this.slabsInUse[k] as Buffer;
      if (this.slabsFree.length < SLABS_KEPT) this.slabsFree.push(slab);
    }
    this.slabsInUse = this.slabsInUse.slice(drop);
    this.slabBase = firstLive;
    if (this.slabsInUse.length === 0) this.slabUsed = 0;
  }

  /** A new slot at the tail (moving the live slots down, or growing the arrays, when the tail reaches the end). */
  private append(start: number, end: number, kind: number, noHole: boolean, seq: number): number {
    if (this.tail === this.cap) this.makeRoom();
    const i = this.tail++;
    if (seq > this.lastSeq) this.lastSeq = seq;
    this.starts[i] = start;
    this.ends[i] = end;
    this.seqs[i] = seq;
    this.kinds[i] = kind;
    this.noHoles[i] = noHole ? 1 : 0;
    this.slabNos[i] = NO_DATA;
    this.dataAt[i] = 0;
    return i;
  }

  private makeRoom(): void {
    const live = this.tail - this.head;
    const cap = live * 2 > this.cap ? this.cap * 2 : this.cap;
    const move = <T extends Float64Array | Int32Array | Uint8Array>(a: T, make: (n: number) => T): T => {
      const to = cap === this.cap ? a : make(cap);
      to.set(a.subarray(this.head, this.tail), 0);
      return to;
    };
    this.starts = move(this.starts, (n) => new Float64Array(n));
    this.ends = move(this.ends, (n) => new Float64Array(n));
    this.seqs = move(this.seqs, (n) => new Float64Array(n));
    this.kinds = move(this.kinds, (n) => new Uint8Array(n));
    this.noHoles = move(this.noHoles, (n) => new Uint8Array(n));
    this.slabNos = move(this.slabNos, (n) => new Float64Array(n));
    this.dataAt = move(this.dataAt, (n) => new Int32Array(n));
    if (this.own.size > 0) {
      const own = new Map<number, Buffer>();
      for (const [slot, buf] of this.own) own.set(slot - this.head, buf);
      this.own = own;
    }
    this.cap = cap;
    this.tail = live;
    this.head = 0;
  }
}

/** A binary max-heap of log slots: the newest entry over an address is on top. */
class SlotHeap {
  private readonly a: Int32Array;
  size = 0;

  constructor(capacity: number) {
    this.a = new Int32Array(capacity);
  }

  get top(): number {
    return this.a[0] as number;
  }

  push(slot: number): void {
    const a = this.a;
    let i = this.size++;
    while (i > 0) {
      const up = (i - 1) >> 1;
      if ((a[up] as number) >= slot) break;
      a[i] = a[up] as number;
      i = up;
    }
    a[i] = slot;
  }

  pop(): void {
    const a = this.a;
    const last = a[--this.size] as number;
    let i = 0;
    for (;;) {
      let child = 2 * i + 1;
      if (child >= this.size) break;
      if (child + 1 < this.size && (a[child + 1] as number) > (a[child] as number)) child++;
      if ((a[child] as number) <= last) break;
      a[i] = a[child] as number;
      i = child;
    }
    a[i] = last;
  }
}
