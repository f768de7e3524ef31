// The collision tracker of one cached device (docs/engine.md §3, §8): which
// writes are in flight, and which operations that must lose to a write are
// watching a range of sectors.
//
// The kernel inserts a placeholder "check key" into the index before it
// fills a cache miss, and replaces it once the data is in the cache; a write
// in between overwrites the placeholder and the fill finds nothing to replace
// (cache_miss_collisions). We keep the same semantics in memory:
//
// - every write (any mode; discards and write-zeroes too) is *active* from
//   before it touches any device or the index until it has finished with
//   both (beginWrite .. endWrite);
// - a *window* watches [start, end): it is collided if an overlapping write
//   was active when it opened, or began while it is open. A miss fill
//   inserts with a guard (btree insert's `guard`) that checks `collided` at
//   the moment the key reaches its leaf, so a racing write always wins,
//   whatever order the awaits resolve in. A read does not open its window
//   before its lookup (most reads are hits and never need one): it notes
//   the epoch (writes begun) and whether a write over it is active, and a
//   fill's window starts collided if either says a write raced the lookup;
// - a *recording* window (the writeback scan) keeps the ranges of those
//   writes, so that each scanned key can be checked on its own.
//
// All sectors are key space (backing sectors, data offset included). Windows
// are indexed by 1 MiB chunk so that a write checks only the windows near
// it, however many fills are waiting for a backing flush.

const CHUNK_SHIFT = 11;

export interface SectorRange {
  start: number;
  end: number;
}

export class Window implements SectorRange {
  readonly start: number;
  readonly end: number;
  collided = false;
  /** Recording windows: the ranges of the writes that collided with it. */
  readonly hits: SectorRange[] | undefined;
  open = true;

  constructor(start: number, end: number, record: boolean) {
    this.start = start;
    this.end = end;
    this.hits = record ? [] : undefined;
  }

  /** Did a write overlapping [start, end) collide with this (recording) window? */
  overlapsHit(start: number, end: number): boolean {
    if (!this.hits) return this.collided;
    for (const h of this.hits) if (h.start < end && start < h.end) return true;
    return false;
  }
}

export class ActiveWrite implements SectorRange {
  readonly start: number;
  readonly end: number;
  constructor(start: number, end: number) {
    this.start = start;
    this.end = end;
  }
}

function overlaps(a: SectorRange, start: number, end: number): boolean {
  return a.start < end && start < a.end;
}

export class CollisionTracker {
  private readonly active = new Set<ActiveWrite>();
  /** Writes begun so far: a read that saw it unchanged across its lookup raced no write. */
  epoch = 0;
  private readonly byChunk = new Map<number, Set<Window>>();
  /** Windows too wide to index (recording windows over the whole device). */
  private readonly wide = new Set<Window>();
  private windows = 0;

  get activeWrites(): number {
    return this.active.size;
  }

  get openWindows(): number {
    return this.windows;
  }

  /** A write is about to touch [start, end): every window over it is collided. */
  beginWrite(start: number, end: number): ActiveWrite {
    this.epoch++;
    const w = new ActiveWrite(start, end);
    this.active.add(w);
    if (this.windows > 0) {
      for (const win of this.wide) this.collide(win, start, end);
      const last = (end - 1) >> CHUNK_SHIFT;
      for (let c = start >> CHUNK_SHIFT; c <= last; c++) {
        const set = this.byChunk.get(c);
        if (set) for (const win of set) this.collide(win, start, end);
      }
    }
    return w;
  }

  /** Is a write overlapping [start, end) in flight now? */
  activeOver(start: number, end: number): boolean {
    if (this.active.size === 0) return false;
    for (const w of this.active) if (overlaps(w, start, end)) return true;
    return false;
  }

  endWrite(w: ActiveWrite): void {
    this.active.delete(w);
  }

  private collide(win: Window, start: number, end: number): void {
    if (!overlaps(win, start, end)) return;
    win.collided = true;
    win.hits?.push({ start, end });
  }

  /**
   * Watch [start, end). Collided at once if an overlapping write is active.
   * `record` keeps every colliding write's range (writeback scans).
   */
  openWindow(start: number, end: number, record = false): Window {
    const win = new Window(start, end, record);
    for (const w of this.active) this.collide(win, w.start, w.end);
    this.windows++;
    if (end - start > 64 << CHUNK_SHIFT) {
      this.wide.add(win);
    } else {
      const last = (end - 1) >> CHUNK_SHIFT;
      for (let c = start >> CHUNK_SHIFT; c <= last; c++) {
        let set = this.byChunk.get(c);
        if (!set) {
          set = new Set();
          this.byChunk.set(c, set);
        }
        set.add(win);
      }
    }
    return win;
  }

  closeWindow(win: Window): void {
    if (!win.open) return;
    win.open = false;
    this.windows--;
    if (this.wide.delete(win)) return;
    const last = (win.end - 1) >> CHUNK_SHIFT;
    for (let c = win.start >> CHUNK_SHIFT; c <= last; c++) {
      const set = this.byChunk.get(c);
      if (!set) continue;
      set.delete(win);
      if (set.size === 0) this.byChunk.delete(c);
    }
  }
}
