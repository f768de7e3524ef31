// The client side of the soak (soak.test.ts): a model of what every block of
// the bcache device may hold, and a pipelined NBD driver over the in-repo raw
// client that keeps a fixed number of requests in flight, notices when none
// of them completes for too long (a hang), and feeds every reply into the
// model.
//
// The model, per 4 KiB block: `stable` is the value the block must hold after
// a crash (a FLUSH or a FUA covered it, or a read after a restart saw it);
// `pending` are the values of writes sent since then that may or may not have
// landed. A read must return the stable value or one of the pending ones, and
// every block's content names its own value and block number, so a torn,
// misplaced or invented block is caught too.

import { Cmd, CmdFlag } from '../../src/nbd/protocol.ts';
import { RawNbdClient, type Reply } from '../helpers/nbd-raw-client.ts';

export const BLOCK = 4096;

const MAGIC = 0xbcac4e;

/** A block's content for `value` (0: all zeroes, what write-zeroes leaves). */
export function content(value: number, block: number): Buffer {
  if (value === 0) return Buffer.alloc(BLOCK);
  const buf = Buffer.alloc(BLOCK, (value * 7 + block) & 0xff);
  buf.writeUInt32LE(value, 0);
  buf.writeUInt32LE(block, 4);
  buf.writeUInt32LE(MAGIC, 8);
  return buf;
}

/** The value a block holds: 0 for zeroes, -1 for anything that is not one whole write of this block. */
export function decode(buf: Buffer, block: number): number {
  if (buf.every((b) => b === 0)) return 0;
  const value = buf.readUInt32LE(0);
  return value !== 0 && buf.equals(content(value, block)) ? value : -1;
}

export class BlockModel {
  private readonly stable: Int32Array;
  private readonly pending = new Map<number, Set<number>>();

  constructor(blocks: number) {
    this.stable = new Int32Array(blocks);
  }

  /** A write of `value` to `block` was sent: it may land from now on. */
  sent(block: number, value: number): void {
    let s = this.pending.get(block);
    if (!s) this.pending.set(block, (s = new Set()));
    s.add(value);
  }

  /** `value` is durable in `block` (a FLUSH covered its write, or it was written with FUA). */
  durable(block: number, value: number): void {
    this.stable[block] = value;
    this.pending.delete(block);
  }

  allowed(block: number, value: number): boolean {
    return value === this.stable[block] || (this.pending.get(block)?.has(value) ?? false);
  }

  /** Why `value` read from `block` is wrong, or undefined if it is allowed. */
  check(block: number, value: number): string | undefined {
    if (value >= 0 && this.allowed(block, value)) return undefined;
    const p = [...(this.pending.get(block) ?? [])];
    return (
      `block ${block} reads ${value < 0 ? 'garbage (not one whole write of this block)' : value}; ` +
      `durable ${this.stable[block]}${p.length > 0 ? `, unflushed ${p.join(',')}` : ''}`
    );
  }
}

export interface PipelineStats {
  reads: number;
  writes: number;
  fua: number;
  zeroes: number;
  flushes: number;
}

/** No request completed for `ms` while some were in flight. */
export class HangError extends Error {
  readonly inFlight: string[];
  constructor(ms: number, inFlight: string[]) {
    super(`no request completed for ${ms} ms with ${inFlight.length} in flight: ${inFlight.join(', ')}`);
    this.inFlight = inFlight;
  }
}

/** The connection went away (the daemon was killed or shut down) under the requests in flight. */
export class ConnectionGone extends Error {}

interface Op {
  label: string;
  send: () => Promise<Reply>;
  /** Called with the reply if the request succeeded. */
  ok: (r: Reply) => void;
}

/**
 * Keeps `depth` requests in flight on one connection. push() waits for a free
 * slot; every reply resolves its slot. A request failing with an NBD error is
 * a test failure unless the driver was told the daemon is going away
 * (stopping()), in which case it is simply not acknowledged.
 */
export class Pipeline {
  readonly client: RawNbdClient;
  private readonly depth: number;
  private readonly hangMs: number;
  private readonly inFlight = new Map<number, string>();
  private nextId = 0;
  private lastProgress = Date.now();
  private slotWaiters: Array<() => void> = [];
  private failure: Error | undefined;
  private going = false;
  private readonly watchdogStop = new AbortController();
  readonly stats: PipelineStats = { reads: 0, writes: 0, fua: 0, zeroes: 0, flushes: 0 };
  /** Writes acknowledged since the last FLUSH was sent: (block, value). */
  private ackedSinceFlush: Array<[number, number]> = [];
  /** Every acknowledged write of this connection (a clean shutdown makes them all durable). */
  readonly acked: Array<[number, number]> = [];
  private readonly model: BlockModel;
  private readonly base: number;

  private constructor(client: RawNbdClient, model: BlockModel, base: number, depth: number, hangMs: number) {
    this.client = client;
    this.model = model;
    this.base = base;
    this.depth = depth;
    this.hangMs = hangMs;
    void this.watchdog();
  }

  /** Connect to `export` on `socket`; `base` is the device offset of model block 0. */
  static async open(
    socket: string,
    model: BlockModel,
    o: { base: number; depth: number; hangMs: number; name?: string },
  ): Promise<Pipeline> {
    const { client } = await RawNbdClient.open({ path: socket }, { name: o.name ?? 'bcache0' });
    return new Pipeline(client, model, o.base, o.depth, o.hangMs);
  }

  /** From now on the daemon is being stopped or killed: failed requests are just not acknowledged. */
  goingAway(): void {
    this.going = true;
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    for (const w of this.slotWaiters.splice(0)) w();
  }

  /** Polls (a deadline check, not synchronisation) for a stretch with no completion. */
  private async watchdog(): Promise<void> {
    const signal = this.watchdogStop.signal;
    while (!signal.aborted) {
      await new Promise<void>((resolve) => {
        const onAbort = (): void => {
          clearTimeout(t);
          resolve();
        };
        const t = setTimeout(() => {
          signal.removeEventListener('abort', onAbort);
          resolve();
        }, 500);
        signal.addEventListener('abort', onAbort, { once: true });
      });
      if (this.inFlight.size > 0 && Date.now() - this.lastProgress > this.hangMs && !this.going) {
        this.fail(new HangError(this.hangMs, [...this.inFlight.values()]));
      }
    }
  }

  private run(op: Op): void {
    const id = this.nextId++;
    this.inFlight.set(id, op.label);
    op.send().then(
      (r) => {
        this.inFlight.delete(id);
        this.lastProgress = Date.now();
        if (r.error !== 0) {
          if (!this.going) this.fail(new Error(`${op.label}: NBD error ${r.error} ${r.message}`));
        } else {
          try {
            op.ok(r);
          } catch (err) {
            this.fail(err instanceof Error ? err : new Error(String(err)));
          }
        }
        this.slotWaiters.shift()?.();
      },
      (err: unknown) => {
        this.inFlight.delete(id);
        if (!this.going) this.fail(new ConnectionGone(`${op.label}: ${String(err)}`));
        this.slotWaiters.shift()?.();
      },
    );
  }

  /** Wait for a free slot, then send. Throws the first failure (hang, error, wrong data). */
  private async push(op: Op): Promise<void> {
    while (this.inFlight.size >= this.depth && !this.failure) {
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
    }
    if (this.failure) throw this.failure;
    this.lastProgress = this.inFlight.size === 0 ? Date.now() : this.lastProgress;
    this.run(op);
  }

  /** Wait until nothing is in flight (or a failure). */
  async drain(): Promise<void> {
    while (this.inFlight.size > 0 && !this.failure) {
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
    }
    if (this.failure) throw this.failure;
  }

  get requestsInFlight(): number {
    return this.inFlight.size;
  }

  read(block: number, onData: (block: number, value: number) => void): Promise<void> {
    this.stats.reads++;
    return this.push({
      label: `read ${block}`,
      send: () => this.client.readAt(this.base + block * BLOCK, BLOCK),
      ok: (r) => {
        onData(block, decode(r.data ?? Buffer.alloc(0), block));
      },
    });
  }

  write(block: number, value: number, fua: boolean): Promise<void> {
    this.stats.writes++;
    if (fua) this.stats.fua++;
    this.model.sent(block, value);
    return this.push({
      label: `write${fua ? '+fua' : ''} ${block}=${value}`,
      send: () => this.client.writeAt(this.base + block * BLOCK, content(value, block), fua ? CmdFlag.FUA : 0),
      ok: () => {
        this.acked.push([block, value]);
        if (fua) this.model.durable(block, value);
        else this.ackedSinceFlush.push([block, value]);
      },
    });
  }

  zeroes(block: number, fua: boolean): Promise<void> {
    this.stats.zeroes++;
    this.model.sent(block, 0);
    return this.push({
      label: `write-zeroes${fua ? '+fua' : ''} ${block}`,
      send: () =>
        this.client.request({
          type: Cmd.WRITE_ZEROES,
          offset: this.base + block * BLOCK,
          length: BLOCK,
          flags: fua ? CmdFlag.FUA : 0,
        }),
      ok: () => {
        this.acked.push([block, 0]);
        if (fua) this.model.durable(block, 0);
        else this.ackedSinceFlush.push([block, 0]);
      },
    });
  }

  /** FLUSH: covers every write acknowledged before it is sent. */
  flush(): Promise<void> {
    this.stats.flushes++;
    const covered = this.ackedSinceFlush;
    this.ackedSinceFlush = [];
    return this.push({
      label: 'flush',
      send: () => this.client.request({ type: Cmd.FLUSH, offset: 0, length: 0, flags: 0 }),
      ok: () => {
        for (const [block, value] of covered) this.model.durable(block, value);
      },
    });
  }

  /** Stop the watchdog and drop the connection. */
  close(): void {
    this.watchdogStop.abort();
    this.goingAway();
    this.client.destroy();
  }
}
