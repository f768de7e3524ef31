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
// The log is an interval map of non-overlapping extents, each the latest
// acknowledged content of its range (data, zeroes or a trim) with the
// sequence number of its acknowledgement: a newer write replaces the part of
// an older one it overlaps, so a replay of the extents in any order leaves
// the newest content everywhere. A FLUSH drops every extent acknowledged
// before the FLUSH was sent (sequence <= its mark); a FUA write is durable
// on acknowledgement and just clears its range.

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

export class UnflushedLog {
  /** Sorted by start, never overlapping. */
  private extents: UnflushedExtent[] = [];
  /** Bytes of data held (zero and trim extents hold none). */
  private held = 0;

  get bytes(): number {
    return this.held;
  }

  get size(): number {
    return this.extents.length;
  }

  /** Record acknowledged data; `data` is copied, so the caller keeps its buffer. */
  putData(start: number, data: Buffer, seq: number): void {
    this.insert({ start, end: start + data.length, kind: 'data', data: Buffer.from(data), noHole: false, seq });
  }

  putZero(start: number, length: number, noHole: boolean, seq: number): void {
    this.insert({ start, end: start + length, kind: 'zero', data: undefined, noHole, seq });
  }

  putTrim(start: number, length: number, seq: number): void {
    this.insert({ start, end: start + length, kind: 'trim', data: undefined, noHole: false, seq });
  }

  /** The range is durable (a FUA write): nothing older in it needs replaying. */
  clear(start: number, length: number): void {
    this.cut(start, start + length);
  }

  /** A FLUSH sent after acknowledgement `mark` completed: everything acknowledged up to it is durable. */
  dropUpTo(mark: number): void {
    const kept: UnflushedExtent[] = [];
    let held = 0;
    for (const e of this.extents) {
      if (e.seq <= mark) continue;
      kept.push(e);
      if (e.data) held += e.data.length;
    }
    this.extents = kept;
    this.held = held;
  }

  /** The extents to replay, in LBA order (they do not overlap, so any order gives the same result). */
  snapshot(): readonly UnflushedExtent[] {
    return this.extents.slice();
  }

  private insert(e: UnflushedExtent): void {
    if (e.end <= e.start) return;
    const at = this.cut(e.start, e.end);
    this.extents.splice(at, 0, e);
    if (e.data) this.held += e.data.length;
  }

  /** Remove [start, end) from every extent (splitting those it cuts); returns where an extent at `start` goes. */
  private cut(start: number, end: number): number {
    const list = this.extents;
    // The first extent that ends after `start` (binary search: extents are sorted and disjoint, so ends are sorted too).
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
      if (e.data) this.held -= e.data.length;
      if (e.start < start) pieces.push(slice(e, e.start, start));
      if (e.end > end) pieces.push(slice(e, end, e.end));
      last++;
    }
    for (const p of pieces) if (p.data) this.held += p.data.length;
    list.splice(first, last - first, ...pieces);
    // The new extent goes after a left piece (which ends at `start`), before a right piece.
    const left = pieces[0];
    return left && left.start < start ? first + 1 : first;
  }
}

/** The part [start, end) of `e`; data is copied so that the log never keeps a larger buffer alive than it counts. */
function slice(e: UnflushedExtent, start: number, end: number): UnflushedExtent {
  return {
    start,
    end,
    kind: e.kind,
    data: e.data ? Buffer.from(e.data.subarray(start - e.start, end - e.start)) : undefined,
    noHole: e.noHole,
    seq: e.seq,
  };
}
