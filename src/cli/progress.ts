// A progress bar for long synchronous work (zeroing a journal area). It stays
// silent unless the work takes more than a moment; then it draws a bar on a
// terminal, or prints a line now and then when stderr is a file or pipe.
// The caller reports progress; the bar reads the clock itself (no timers).

export interface ProgressOptions {
  /** Where to draw; stderr by default. */
  stream?: { isTTY?: boolean; write(text: string): unknown };
  /** Milliseconds of silence before anything is shown. */
  delayMs?: number;
  /** Milliseconds between lines when not on a terminal. */
  lineIntervalMs?: number;
  now?: () => number;
}

export class Progress {
  private readonly label: string;
  private readonly total: number;
  private readonly stream: { isTTY?: boolean; write(text: string): unknown };
  private readonly delayMs: number;
  private readonly lineIntervalMs: number;
  private readonly now: () => number;
  private readonly start: number;
  private lastDraw = -Infinity;
  private shown = false;

  constructor(label: string, total: number, options: ProgressOptions = {}) {
    this.label = label;
    this.total = Math.max(total, 1);
    this.stream = options.stream ?? process.stderr;
    this.delayMs = options.delayMs ?? 500;
    this.lineIntervalMs = options.lineIntervalMs ?? 2000;
    this.now = options.now ?? Date.now;
    this.start = this.now();
  }

  /** `done` units of `total` are finished. */
  update(done: number): void {
    const t = this.now();
    if (t - this.start < this.delayMs) return;
    const tty = this.stream.isTTY === true;
    if (!tty && t - this.lastDraw < this.lineIntervalMs) return;
    if (tty && t - this.lastDraw < 100) return;
    this.lastDraw = t;
    this.shown = true;
    const pct = Math.min(100, Math.floor((done / this.total) * 100));
    if (tty) {
      const width = 30;
      const full = Math.round((pct / 100) * width);
      this.stream.write(`\r${this.label} [${'#'.repeat(full)}${'.'.repeat(width - full)}] ${String(pct).padStart(3)}%`);
    } else {
      this.stream.write(`${this.label}: ${pct}%\n`);
    }
  }

  /** The work is over: complete the bar if one was shown. */
  finish(): void {
    if (!this.shown) return;
    if (this.stream.isTTY === true) this.stream.write(`\r${this.label} [${'#'.repeat(30)}] 100%\n`);
    else this.stream.write(`${this.label}: done\n`);
  }
}
