// What every client of the simulated bcache devices may read: the durability
// contract (docs/design.md) as a checkable model, sector by sector.
//
// Each write has an id, and the data it writes says (device, id, sector) in
// every sector, so a read tells exactly which write each sector came from.
// Time here is the model's own event counter (every client operation's start
// and end is an event), so "before" and "during" are exact even when many
// events share one simulated millisecond. The driver never has two writes to
// one sector in flight at once (as a filesystem would not), so the writes to a
// sector complete in the order they were issued.
//
// Per sector the model keeps `base`, the writes it may hold as of the last
// power cut (initially only "never written", id 0; after a power cut, every
// write that was not known durable, since the crash may have kept any of
// them), and `hist`, the writes since then in issue order:
//
// - a read that started at event t0 and ended at t1 may return the newest
//   write completed before t0 (or, if there is none, any of `base`) or any
//   write in flight at some point in [t0, t1];
// - a completed FLUSH that was issued at f makes the newest write completed
//   before f durable; a FUA write is durable once it completes;
// - after a power cut a sector may hold its newest durable write or any write
//   after it (with none durable: any of `base` or of `hist`);
// - a write that failed (an injected I/O error reached the client) may have
//   landed or not: until a later write completes, a read may return it or
//   what a read could have returned before it; it is never durable itself.
// Discards and write-zeroes are writes of "0" (what the simulated backing
// device returns for both).

export interface WriteRec {
  readonly id: number;
  readonly start: number;
  end: number | undefined;
  /** Covered by a completed FLUSH, or a completed FUA write: it survives a power cut. */
  durable: boolean;
  /**
   * It failed (an I/O error reached the client): it may have landed or not,
   * in part or whole, so a read may return it or what it would have replaced.
   */
  failed: boolean;
}

interface SectorState {
  /** The writes the sector may hold as of the last power cut (0: never written). */
  base: number[];
  /** Writes since then, in issue order. */
  hist: WriteRec[];
}

const SECTOR = 512;
const TAG_RE = /^d(\d+)w(\d+)s(\d+)\|/;

/** The content of `count` sectors from `first` of write `id` on device `dev`: every sector names all three. */
export function encodeWrite(dev: number, id: number, first: number, count: number): Buffer {
  const buf = Buffer.alloc(count * SECTOR);
  for (let s = 0; s < count; s++) {
    const tag = `d${dev}w${id}s${first + s}|`;
    buf.write(tag.repeat(Math.ceil(SECTOR / tag.length)).slice(0, SECTOR), s * SECTOR, 'latin1');
  }
  return buf;
}

/** Which write a sector read holds: its id (0: never written, all zeroes), or a description of garbage. */
export function decodeSector(buf: Buffer, dev: number, sector: number): number | string {
  if (buf.every((b) => b === 0)) return 0;
  const head = buf.toString('latin1', 0, 40);
  const m = TAG_RE.exec(head);
  if (!m) return `garbage ${JSON.stringify(head.slice(0, 24))}`;
  const [, d, w, s] = m;
  const want = encodeWrite(dev, Number(w), sector, 1);
  if (Number(d) !== dev || Number(s) !== sector || !buf.equals(want)) {
    return `data of device ${d} write ${w} sector ${s}${buf.equals(encodeWrite(Number(d), Number(w), Number(s), 1)) ? '' : ' (corrupt)'}`;
  }
  return Number(w);
}

export class ClientModel {
  private ev = 0;
  private readonly devs: Array<Map<number, SectorState>>;

  constructor(devices: number) {
    this.devs = Array.from({ length: devices }, () => new Map<number, SectorState>());
  }

  /** The next event. */
  tick(): number {
    return ++this.ev;
  }

  private state(dev: number, sector: number): SectorState {
    const m = this.devs[dev];
    if (m === undefined) throw new RangeError(`model: no device ${dev}`);
    let st = m.get(sector);
    if (!st) {
      st = { base: [0], hist: [] };
      m.set(sector, st);
    }
    return st;
  }

  /** Sectors ever written on `dev`, in order. */
  written(dev: number): number[] {
    return [...(this.devs[dev]?.keys() ?? [])].sort((a, b) => a - b);
  }

  /** Is a write to [first, first+count) of `dev` in flight? (The driver keeps writes to a sector apart.) */
  writeInFlight(dev: number, first: number, count: number): boolean {
    const m = this.devs[dev];
    if (!m) return false;
    for (let s = first; s < first + count; s++) {
      const st = m.get(s);
      if (st?.hist.some((r) => r.end === undefined)) return true;
    }
    return false;
  }

  beginWrite(dev: number, first: number, count: number, id: number): WriteRec {
    const rec: WriteRec = { id, start: this.tick(), end: undefined, durable: false, failed: false };
    for (let s = first; s < first + count; s++) this.state(dev, s).hist.push(rec);
    return rec;
  }

  endWrite(rec: WriteRec, fua: boolean): void {
    rec.end = this.tick();
    if (fua) rec.durable = true;
  }

  /** The write failed: it ended, but whether its data landed is unknown (and it is never durable). */
  failWrite(rec: WriteRec): void {
    rec.end = this.tick();
    rec.failed = true;
  }

  beginRead(): number {
    return this.tick();
  }

  /**
   * Check a read of [first, first+count) of `dev` that began at `t0` and just
   * returned `buf`. Returns what is wrong (undefined: nothing).
   */
  checkRead(dev: number, first: number, count: number, t0: number, buf: Buffer): string | undefined {
    const t1 = this.tick();
    for (let i = 0; i < count; i++) {
      const sector = first + i;
      const got = decodeSector(buf.subarray(i * SECTOR, (i + 1) * SECTOR), dev, sector);
      const st = this.state(dev, sector);
      const allowed = new Set<number>();
      // The newest write completed before the read; past a failed one, also what it would have replaced.
      let settled = false;
      for (let k = st.hist.length - 1; k >= 0 && !settled; k--) {
        const r = st.hist[k];
        if (r?.end === undefined || r.end >= t0) continue;
        allowed.add(r.id);
        settled = !r.failed;
      }
      if (!settled) for (const id of st.base) allowed.add(id);
      for (const r of st.hist) if (r.start < t1 && (r.end === undefined || r.end > t0)) allowed.add(r.id);
      if (typeof got === 'string' || !allowed.has(got)) {
        const what = typeof got === 'string' ? got : got === 0 ? 'never-written zeroes' : `write ${got}`;
        return `device ${dev} sector ${sector}: read ${what}; allowed: writes ${[...allowed].join(', ')}`;
      }
      // Reading settles an uncertain base (after a power cut): later reads must agree with this one.
      if (st.hist.length === 0 && st.base.length > 1) st.base = [got];
    }
    return undefined;
  }

  beginFlush(): number {
    return this.tick();
  }

  /** A FLUSH of `dev` issued at event `f0` completed: what completed before it is durable. */
  endFlush(dev: number, f0: number): void {
    this.tick();
    for (const st of this.devs[dev]?.values() ?? []) {
      // A failed write is never durable; the newest that did not fail is (a failed one after it may have landed).
      let newest: WriteRec | undefined;
      for (const r of st.hist) if (r.end !== undefined && r.end < f0 && !r.failed) newest = r;
      if (newest) newest.durable = true;
    }
  }

  /** The power went: any write not known durable may or may not have survived, each sector on its own. */
  powerCut(): void {
    this.tick();
    for (const m of this.devs) {
      for (const st of m.values()) {
        if (st.hist.length === 0) continue;
        let from = -1;
        for (let i = 0; i < st.hist.length; i++) if (st.hist[i]?.durable === true) from = i;
        const ids = new Set(from < 0 ? st.base : []);
        for (const r of st.hist.slice(Math.max(0, from))) ids.add(r.id);
        st.base = [...ids];
        st.hist = [];
      }
    }
  }
}
