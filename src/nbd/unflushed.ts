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

interface LogEntry {
  start: number;
  end: number;
  /** 'clear': a FUA write made the range durable; nothing older in it is replayed. */
  kind: UnflushedKind | 'clear';
  data: Buffer | undefined;
  noHole: boolean;
  seq: number;
}

export class UnflushedLog {
  /** In acknowledgement order (seq never decreases); entries before `head` are dropped. */
  private entries: LogEntry[] = [];
  private head = 0;
  /** Bytes of data held (zero, trim and clear entries hold none). */
  private held = 0;
  private lastSeq = 0;
  private slab: Buffer | undefined;
  private slabUsed = 0;
  /** Slabs holding live entries' data, oldest first (the last is `slab`). */
  private slabsInUse: Buffer[] = [];
  private slabsFree: Buffer[] = [];

  get bytes(): number {
    return this.held;
  }

  /** Entries held (an overwritten range counts once per write until a FLUSH drops it). */
  get size(): number {
    return this.entries.length - this.head;
  }

  /** Record acknowledged data; `data` is copied, so the caller keeps its buffer. */
  putData(start: number, data: Buffer, seq: number): void {
    if (data.length === 0) return;
    this.append({ start, end: start + data.length, kind: 'data', data: this.copy(data), noHole: false, seq });
    this.held += data.length;
  }

  putZero(start: number, length: number, noHole: boolean, seq: number): void {
    this.append({ start, end: start + length, kind: 'zero', data: undefined, noHole, seq });
  }

  putTrim(start: number, length: number, seq: number): void {
    this.append({ start, end: start + length, kind: 'trim', data: undefined, noHole: false, seq });
  }

  /** The range is durable (a FUA write): nothing older in it needs replaying. */
  clear(start: number, length: number): void {
    if (this.size === 0) return;
    this.append({ start, end: start + length, kind: 'clear', data: undefined, noHole: false, seq: this.lastSeq });
  }

  /** A FLUSH sent after acknowledgement `mark` completed: everything acknowledged up to it is durable. */
  dropUpTo(mark: number): void {
    const list = this.entries;
    let h = this.head;
    while (h < list.length) {
      const e = list[h] as LogEntry;
      if (e.seq > mark) break;
      if (e.data) this.held -= e.data.length;
      h++;
    }
    this.recycleSlabs(h);
    if (h === list.length) {
      this.entries = [];
      this.head = 0;
    } else if (h > 1024 && h * 2 > list.length) {
      this.entries = list.slice(h);
      this.head = 0;
    } else {
      // Let the dropped entries (and their slabs) go.
      for (let i = this.head; i < h; i++) list[i] = DROPPED;
      this.head = h;
    }
  }

  /**
   * The newest content of every range, sorted by start and not overlapping,
   * to replay (any order gives the same result). Data are copies: the log
   * reuses its slabs once a FLUSH drops what they held.
   */
  snapshot(): readonly UnflushedExtent[] {
    const map = new IntervalMap();
    for (let i = this.head; i < this.entries.length; i++) {
      const e = this.entries[i] as LogEntry;
      if (e.kind === 'clear') map.cut(e.start, e.end);
      else map.insert({ start: e.start, end: e.end, kind: e.kind, data: e.data, noHole: e.noHole, seq: e.seq });
    }
    for (const e of map.extents) if (e.data) e.data = Buffer.from(e.data);
    return map.extents;
  }

  /**
   * Entries before `h` are dropped: the slabs older than the one holding the
   * first live entry's data hold nothing live (entries fill slabs in log
   * order). With nothing live at all, every slab is free (the current one too).
   */
  private recycleSlabs(h: number): void {
    const inUse = this.slabsInUse;
    let keepFrom = inUse.length;
    for (let i = h; i < this.entries.length; i++) {
      const d = (this.entries[i] as LogEntry).data;
      if (d === undefined || d.length > SLAB_PIECE_MAX) continue;
      keepFrom = inUse.findIndex((slab) => slab.buffer === d.buffer);
      break;
    }
    if (keepFrom <= 0) return;
    for (let i = 0; i < keepFrom; i++) {
      const slab = inUse[i] as Buffer;
      if (this.slabsFree.length < SLABS_KEPT) this.slabsFree.push(slab);
    }
    this.slabsInUse = inUse.slice(keepFrom);
    if (this.slabsInUse.length === 0) this.slab = undefined;
  }

  private append(e: LogEntry): void {
    if (e.end <= e.start) return;
    if (e.seq > this.lastSeq) this.lastSeq = e.seq;
    this.entries.push(e);
  }

  private copy(data: Buffer): Buffer {
    const n = data.length;
    if (n > SLAB_PIECE_MAX) return Buffer.from(data);
    let slab = this.slab;
    if (slab === undefined || this.slabUsed + n > slab.length) {
      slab = this.slab = this.slabsFree.pop() ?? Buffer.allocUnsafeSlow(SLAB_BYTES);
      this.slabsInUse.push(slab);
      this.slabUsed = 0;
    }
    const out = slab.subarray(this.slabUsed, this.slabUsed + n);
    data.copy(out);
    // Keep pieces 8-byte aligned, as Node's own pool does.
    this.slabUsed += (n + 7) & ~7;
    return out;
  }
}

const DROPPED: LogEntry = { start: 0, end: 0, kind: 'trim', data: undefined, noHole: false, seq: 0 };

/** Non-overlapping extents sorted by start, the newest content of each range (the fold at replay). */
class IntervalMap {
  readonly extents: UnflushedExtent[] = [];

  insert(e: UnflushedExtent): void {
    const at = this.cut(e.start, e.end);
    this.extents.splice(at, 0, e);
  }

  /** Remove [start, end) from every extent (splitting those it cuts); returns where an extent at `start` goes. */
  cut(start: number, end: number): number {
    const list = this.extents;
    // The first extent that ends after `start` (extents are sorted and disjoint, so ends are sorted too).
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((list[mid]?.end ?? 0) <= start) lo = mid + 1;
      else hi = mid;
    }
    const first = lo;
    let last = first;
    const pieces: UnflushedExtent[] = [];
    while (last < list.length) {
      const e = list[last];
      if (!e || e.start >= end) break;
      if (e.start < start) pieces.push(slice(e, e.start, start));
      if (e.end > end) pieces.push(slice(e, end, e.end));
      last++;
    }
    list.splice(first, last - first, ...pieces);
    // The new extent goes after a left piece (which ends at `start`), before a right piece.
    const left = pieces[0];
    return left && left.start < start ? first + 1 : first;
  }
}

/** The part [start, end) of `e` (its data a view of e's). */
function slice(e: UnflushedExtent, start: number, end: number): UnflushedExtent {
  return {
    start,
    end,
    kind: e.kind,
    data: e.data ? e.data.subarray(start - e.start, end - e.start) : undefined,
    noHole: e.noHole,
    seq: e.seq,
  };
}
