// A BlockDevice over a remote NBD export, through ubcache's own client
// (nbd/client.ts): a remote disk as a backing or cache device, with the
// socket I/O on the event loop.
//
// Outages: the client rides out a lost server (client.ts): requests wait
// while it reconnects with backoff, for up to the outage timeout (30 s by
// default; `outageTimeoutMs`, or outage-timeout=SECONDS in the URI), and are
// then sent again, so a restart of the server costs our callers latency, not
// errors. A server that breaks the protocol, or comes back with a different
// size, flags or block sizes, fails the device at once. Past the timeout the
// device is gone: isGone() turns true and every request fails with EIO, so
// bcache takes its offline path (cached-dev.ts: io_errors, the offline
// watch) exactly as for a pulled disk. stats() counts reconnects and outage
// time for /metrics.
//
// Durability across a reconnect. What is really at risk is a write the server
// acknowledged but held in a volatile cache (its own, or its machine's page
// cache) when it went away: a FLUSH that covered it made it safe, nothing
// else did. The client keeps every acknowledged write until a FLUSH covers it
// (it flushes by itself past 4 MiB of them, and new writes wait at 64 MiB) and
// writes it again after reconnecting, before any other request, so the
// server holds again everything our callers were told was written; a FLUSH
// in flight at the loss is re-sent after them and covers them. That loses
// nothing acknowledged to bcache and lets writeback complete through a
// restart. Failing the next FLUSH once with EIO (a sticky fdatasync error)
// would be safe too, but would turn every server restart into an I/O error
// for bcache (io_errors) and for clients in writethrough mode.
//
// The device promises what the BlockDevice contract says whatever the server
// offers: FUA without SEND_FUA is a write and then a flush; zeroing without
// WRITE_ZEROES writes zeroes (but a fast-only zero is refused, as it would
// not be fast); a discard without TRIM is an accepted no-op. A flush is a
// no-op only when the server has no SEND_FLUSH, which by the spec means it
// has no volatile cache: its writes are durable when acknowledged.

import { NbdClient, type NbdClientOptions } from '../nbd/client.ts';
import { TxFlag } from '../nbd/protocol.ts';
import { parseNbdUri, type NbdUri } from '../nbd/uri.ts';
import { rejectWith } from '../util/lifecycle.ts';
import {
  checkRange,
  IoError,
  type BlockDevice,
  type BlockDeviceCaps,
  type BlockDeviceStats,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from './types.ts';

export interface NbdDeviceOptions extends NbdClientOptions {
  /** Refuse writes even if the export is writable. */
  readOnly?: boolean;
}

/** Zeroes written in pieces of this when the server cannot WRITE_ZEROES. */
const ZERO_PIECE = 1024 * 1024;
/** Pieces of written zeroes in flight at once. */
const ZERO_WINDOW = 8;

let zeroes: Buffer | undefined;

export class NbdBlockDevice implements BlockDevice {
  /** The URI, as given. */
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly caps: BlockDeviceCaps;
  /** The client, for diagnostics (connections, request counts). */
  readonly client: NbdClient;
  private closed = false;

  private constructor(client: NbdClient, readOnly: boolean) {
    this.client = client;
    this.name = client.name;
    this.size = client.size;
    // Without NBD_INFO_BLOCK_SIZE the spec tells clients to use 512-byte alignment, as the Linux nbd driver does.
    this.logicalBlockSize = client.info.advertisedBlockSize?.min ?? 512;
    this.readOnly = readOnly || this.has(TxFlag.READ_ONLY);
    this.caps = {
      discard: this.has(TxFlag.SEND_TRIM),
      fastZero: this.has(TxFlag.SEND_FAST_ZERO),
      blockStatus: client.info.baseAllocationId !== undefined,
      rotational: this.has(TxFlag.ROTATIONAL),
    };
  }

  /** Connect to the export `uri` names. Errors say which server and what went wrong. */
  static async open(uri: string | NbdUri, options: NbdDeviceOptions = {}): Promise<NbdBlockDevice> {
    const parsed = typeof uri === 'string' ? parseNbdUri(uri) : uri;
    const client = await NbdClient.connect(parsed, options);
    return new NbdBlockDevice(client, options.readOnly ?? false);
  }

  private has(flag: number): boolean {
    return (this.client.flags & TxFlag.HAS_FLAGS) !== 0 && (this.client.flags & flag) !== 0;
  }

  private live(): void {
    if (this.closed) throw new IoError('ESHUTDOWN', `${this.name}: device is closed`);
  }

  private writable(offset: number, length: number): void {
    this.live();
    if (this.readOnly) throw new IoError('EPERM', `${this.name}: device is read-only`);
    checkRange(this, offset, length, true);
  }

  // read and write hand back the client's promise rather than awaiting it in
  // an async function of their own: one promise and frame fewer per request.
  read(buf: Buffer, offset: number): Promise<void> {
    try {
      this.live();
      checkRange(this, offset, buf.length);
    } catch (err) {
      return rejectWith(err);
    }
    return this.client.read(buf, offset);
  }

  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    try {
      this.writable(offset, buf.length);
    } catch (err) {
      return rejectWith(err);
    }
    if (options?.fua !== true) return this.client.write(buf, offset);
    if (this.has(TxFlag.SEND_FUA)) return this.client.write(buf, offset, { fua: true });
    return this.client.write(buf, offset).then(() => this.flush());
  }

  async flush(): Promise<void> {
    this.live();
    if (this.has(TxFlag.SEND_FLUSH)) await this.client.flush();
  }

  async discard(offset: number, length: number): Promise<void> {
    this.writable(offset, length);
    if (!this.caps.discard) return;
    // A discard is a hint: round inward to what the server can take rather than fail.
    const a = this.client.alignment;
    const start = Math.ceil(offset / a) * a;
    const end = Math.floor((offset + length) / a) * a;
    if (end > start) await this.client.trim(start, end - start);
  }

  async writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    this.writable(offset, length);
    const fua = options?.fua === true;
    const nativeFua = fua && this.has(TxFlag.SEND_FUA);
    if (options?.fastOnly === true && !this.caps.fastZero) {
      throw new IoError('ENOTSUP', `${this.name}: the server cannot promise a fast zero (no SEND_FAST_ZERO)`);
    }
    if (length === 0) return;
    if (this.has(TxFlag.SEND_WRITE_ZEROES)) {
      await this.client.writeZeroes(offset, length, {
        noHole: options?.noHole === true,
        fastZero: options?.fastOnly === true,
        fua: nativeFua,
      });
    } else {
      await this.writeZeroBuffers(offset, length);
    }
    if (fua && !nativeFua) await this.flush();
  }

  /** WRITE_ZEROES emulated with writes, a window of pieces at a time. */
  private async writeZeroBuffers(offset: number, length: number): Promise<void> {
    const zero = (zeroes ??= Buffer.alloc(ZERO_PIECE));
    const end = offset + length;
    let next = offset;
    const worker = async (): Promise<void> => {
      while (next < end) {
        const at = next;
        const n = Math.min(ZERO_PIECE, end - at);
        next += n;
        await this.client.write(n === ZERO_PIECE ? zero : zero.subarray(0, n), at);
      }
    };
    const results = await Promise.allSettled(Array.from({ length: ZERO_WINDOW }, worker));
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.live();
    checkRange(this, offset, length);
    if (length === 0) return [];
    if (!this.caps.blockStatus) return [{ length, hole: false, zero: false }];
    return this.client.blockStatus(offset, length);
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.client.close();
  }

  /** The connection is lost for good (an outage past its timeout, a broken server): the device is as good as unplugged. */
  isGone(): Promise<boolean> {
    return Promise.resolve(!this.closed && this.client.failed !== undefined);
  }

  /** Reconnects and time spent in outages (reconnecting, or failed past the timeout). */
  get reconnects(): number {
    return this.client.reconnects;
  }

  get outageMs(): number {
    return this.client.outageMs;
  }

  stats(): BlockDeviceStats {
    return {
      reconnects: this.client.reconnects,
      outageMs: this.client.outageMs,
      online: this.client.online,
      outageTimeoutMs: this.client.outageTimeoutMs,
    };
  }

  setOutageTimeout(ms: number): void {
    this.client.outageTimeoutMs = ms;
  }
}
