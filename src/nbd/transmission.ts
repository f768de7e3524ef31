// The transmission phase of one connection: parse requests from the pushed
// socket chunks, validate them as the spec says, run them concurrently against
// the export's BlockDevice and send replies as they complete (out of order, by
// cookie).
//
// Speed and safety come from the same few rules:
// - a request is dispatched as soon as its header (and payload) is parsed;
//   nothing awaits one request before parsing the next;
// - a WRITE payload that lies inside one received chunk is used in place;
// - a READ reply is one buffer, header then data, which the device fills;
// - the work in flight is bounded (requests and bytes, replies queued on the
//   socket included): past the bound the socket is paused, mid-chunk if need
//   be, so a flood of requests cannot exhaust memory;
// - a protocol violation drops this connection only.

import type { Socket } from 'node:net';
import { errorCode } from '../blockdev/types.ts';
import { errorMessage, sleep } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import {
  decodeRequestHeader,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeSimpleReply,
  OFFSET_DATA_PREFIX,
  writeOffsetDataPrefix,
  writeSimpleReplyHeader,
  type RequestHeader,
  type StatusDescriptor,
} from './codec.ts';
import { ioBuffers } from '../util/buffer-pool.ts';
import type { Export } from './exports.ts';
import type { Negotiated } from './handshake.ts';
import {
  Cmd,
  CmdFlag,
  commandName,
  NbdErr,
  nbdErrorFromErrno,
  nbdErrorName,
  REQUEST_HEADER_SIZE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_HEADER_SIZE,
  State,
  TxFlag,
  type NbdError,
} from './protocol.ts';

export interface TransmissionOptions {
  /** Pause reading once this many requests are in flight. */
  maxInflightRequests: number;
  /** Pause reading once this many bytes (payloads, read buffers, queued replies) are in flight. */
  maxInflightBytes: number;
  /** A rejected WRITE's payload up to this size is read and dropped; a larger one ends the connection. */
  maxDiscardedPayload: number;
  /** After we end our side, how long the client has to close before the socket is destroyed. */
  endGraceMs: number;
}

export const defaultTransmissionOptions: TransmissionOptions = {
  maxInflightRequests: 128,
  maxInflightBytes: 32 * 1024 * 1024,
  maxDiscardedPayload: 128 * 1024 * 1024,
  endGraceMs: 2000,
};

/** CACHE reads ahead in pieces of this size, so a 4 GiB prefetch needs only this much memory. */
const CACHE_PIECE = 1024 * 1024;
/** Success replies batched per turn (replyOk): 64 of them, a size Node serves from its shared buffer pool. */
const OK_BATCH_BYTES = 64 * SIMPLE_REPLY_HEADER_SIZE;
/** At most this many block-status descriptors per reply (the spec allows fewer than asked for). */
const MAX_EXTENTS = 65536;

interface Request {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
  /** Bytes charged against maxInflightBytes while the request lives. */
  cost: number;
}

interface Rejection {
  error: NbdError;
  message: string;
}

const KNOWN_FLAGS = CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE | CmdFlag.FAST_ZERO;

export class Transmission {
  private readonly socket: Socket;
  private readonly exp: Export;
  private readonly structured: boolean;
  private readonly baseAllocationId: number | undefined;
  private readonly opts: TransmissionOptions;
  private readonly label: string;

  // Parser state.
  private readonly header = Buffer.alloc(REQUEST_HEADER_SIZE);
  private headerHave = 0;
  private writeReq: Request | undefined;
  private payload: Buffer | undefined;
  private payloadHave = 0;
  private discardLeft = 0;
  private stash: Buffer[] = [];
  private consuming = false;

  // Flow and lifecycle.
  private inflight = 0;
  private inflightBytes = 0;
  private paused = false;
  private corked = false;
  /** This turn's batch of success replies (replyOk), and how much of it is used. */
  private okBatch: Buffer | undefined;
  private okBatchUsed = 0;
  /** No more requests will be parsed (DISC, peer EOF, violation, or our end()). */
  private stopped = false;
  /** The client closed its side; what was received before is still served. */
  private inputEnded = false;
  private shuttingDown = false;
  private ended = false;
  private closed = false;
  private readonly graceAbort = new AbortController();
  private resolveDone!: () => void;
  /** Resolves once the socket is closed and no request is in flight. */
  readonly done: Promise<void>;

  constructor(
    socket: Socket,
    negotiated: Negotiated,
    label: string,
    handover: { leftover: Buffer[]; paused: boolean },
    options: Partial<TransmissionOptions> = {},
  ) {
    this.socket = socket;
    this.exp = negotiated.export;
    this.structured = negotiated.structuredReplies;
    this.baseAllocationId = negotiated.baseAllocationId;
    this.opts = { ...defaultTransmissionOptions, ...options };
    this.label = label;
    this.done = new Promise<void>((resolve) => {
      this.resolveDone = resolve;
    });

    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('drain', this.onDrain);
    socket.on('close', this.onClose);
    if (socket.destroyed) this.onClose();

    // Requests that arrived with the end of the handshake, and perhaps the client's EOF after them.
    this.paused = handover.paused;
    this.inputEnded = socket.readableEnded;
    for (const chunk of handover.leftover) this.onData(chunk);
    if (this.paused) this.maybeResume();
    this.checkEndOfInput();
    this.finishIfIdle();
  }

  /** Requests currently being served. */
  get requestsInFlight(): number {
    return this.inflight;
  }

  /**
   * Begin a graceful shutdown: requests already received run to completion,
   * new ones are answered with ESHUTDOWN, and once nothing is in flight our
   * side of the connection is closed.
   */
  shutdown(): void {
    this.shuttingDown = true;
    this.finishIfIdle();
  }

  /** Hard disconnect (protocol violation). Requests in flight still finish; their replies are dropped. */
  abort(reason: string): void {
    log.warn(`${this.label}: ${reason}; closing the connection`);
    this.stopped = true;
    this.socket.destroy();
  }

  // -------------------------------------------------------------------------
  // Socket events

  private readonly onData = (chunk: Buffer): void => {
    if (this.stopped) return; // after DISC or our end(): drain and ignore, so the close is clean
    if (this.paused || this.consuming || this.stash.length > 0) {
      this.stash.push(chunk);
      return;
    }
    this.consume(chunk);
  };

  private readonly onEnd = (): void => {
    // The client shut its side. Requests already received still get their replies.
    this.inputEnded = true;
    this.checkEndOfInput();
  };

  /** Once the client has closed its side and everything it sent is parsed, stop parsing. */
  private checkEndOfInput(): void {
    if (!this.inputEnded || this.stopped || this.paused || this.consuming || this.stash.length > 0) return;
    if (this.headerHave > 0 || this.writeReq || this.discardLeft > 0) {
      log.debug(`${this.label}: client closed the connection in the middle of a request`);
    }
    this.stopped = true;
    this.releasePartialWrite();
    this.finishIfIdle();
  }

  private readonly onDrain = (): void => {
    this.maybeResume();
  };

  private readonly onClose = (): void => {
    if (this.closed) return;
    this.closed = true;
    this.stopped = true;
    this.releasePartialWrite();
    this.graceAbort.abort();
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('drain', this.onDrain);
    this.settleIfDone();
  };

  // -------------------------------------------------------------------------
  // Parsing

  private consume(chunk: Buffer): void {
    this.consuming = true;
    try {
      this.consumeChunk(chunk);
      while (!this.paused && !this.stopped && this.stash.length > 0) {
        const next = this.stash.shift();
        if (next) this.consumeChunk(next);
      }
    } finally {
      this.consuming = false;
    }
    this.checkEndOfInput();
  }

  private consumeChunk(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length && !this.stopped) {
      if (this.discardLeft > 0) {
        const k = Math.min(this.discardLeft, chunk.length - at);
        this.discardLeft -= k;
        at += k;
        continue;
      }
      const req = this.writeReq;
      if (req) {
        at = this.takePayload(req, chunk, at);
        continue;
      }
      if (this.headerHave === 0 && this.busy()) {
        // Over the bound: keep the rest for later and stop reading until work completes.
        this.stash.unshift(chunk.subarray(at));
        this.pause();
        return;
      }
      if (this.headerHave === 0 && chunk.length - at >= REQUEST_HEADER_SIZE) {
        const h = decodeRequestHeader(chunk, at);
        at += REQUEST_HEADER_SIZE;
        this.onHeader(h);
        continue;
      }
      const k = Math.min(REQUEST_HEADER_SIZE - this.headerHave, chunk.length - at);
      chunk.copy(this.header, this.headerHave, at, at + k);
      this.headerHave += k;
      at += k;
      if (this.headerHave === REQUEST_HEADER_SIZE) {
        this.headerHave = 0;
        this.onHeader(decodeRequestHeader(this.header, 0));
      }
    }
  }

  /** Collect a WRITE payload: in place when it lies inside one chunk, else copied into its own buffer. */
  private takePayload(req: Request, chunk: Buffer, at: number): number {
    const need = req.length - this.payloadHave;
    if (this.payloadHave === 0 && chunk.length - at >= need) {
      this.writeReq = undefined;
      this.dispatch(req, chunk.subarray(at, at + need));
      return at + need;
    }
    const buf = (this.payload ??= ioBuffers.acquire(req.length));
    const k = Math.min(need, chunk.length - at);
    chunk.copy(buf, this.payloadHave, at, at + k);
    this.payloadHave += k;
    if (this.payloadHave === req.length) {
      this.writeReq = undefined;
      this.payload = undefined;
      this.payloadHave = 0;
      this.dispatch(req, buf);
    }
    return at + k;
  }

  private onHeader(h: RequestHeader): void {
    if (h.magic !== REQUEST_MAGIC) {
      this.abort(`bad request magic 0x${h.magic.toString(16)} (expected 0x${REQUEST_MAGIC.toString(16)})`);
      return;
    }
    if (h.type === Cmd.DISC) {
      log.debug(`${this.label}: client sent NBD_CMD_DISC`);
      this.stopped = true;
      this.finishIfIdle();
      return;
    }
    const isWrite = h.type === Cmd.WRITE;
    const rejection: Rejection | undefined = this.shuttingDown
      ? { error: NbdErr.ESHUTDOWN, message: 'the server is shutting down' }
      : this.validate(h);
    if (rejection) {
      if (isWrite && h.length > this.opts.maxDiscardedPayload) {
        this.abort(`rejected NBD_CMD_WRITE carries a ${h.length}-byte payload, too large to skip`);
        return;
      }
      log.debug(
        `${this.label}: ${commandName(h.type)} rejected with ${nbdErrorName(rejection.error)}: ${rejection.message}`,
      );
      this.sendError(h.cookie, rejection.error, rejection.message);
      // The payload of a rejected write is still on its way: consume it so the stream stays in sync.
      if (isWrite) this.discardLeft = h.length;
      return;
    }
    const req: Request = {
      flags: h.flags,
      type: h.type,
      cookie: h.cookie,
      offset: h.offset,
      length: h.length,
      cost: this.costOf(h),
    };
    this.inflight++;
    this.inflightBytes += req.cost;
    if (isWrite && h.length > 0) this.writeReq = req;
    else this.dispatch(req, undefined);
  }

  private costOf(h: RequestHeader): number {
    switch (h.type) {
      case Cmd.READ:
      case Cmd.WRITE:
        return h.length;
      case Cmd.CACHE:
        return Math.min(h.length, CACHE_PIECE);
      default:
        return 0;
    }
  }

  /** The spec's validation (proto.md "Request types", "Error values"); nbdkit's order where the spec is silent. */
  private validate(h: RequestHeader): Rejection | undefined {
    const exp = this.exp;
    const name = (): string => commandName(h.type);
    const writes = h.type === Cmd.WRITE || h.type === Cmd.TRIM || h.type === Cmd.WRITE_ZEROES;
    switch (h.type) {
      case Cmd.READ:
      case Cmd.WRITE:
      case Cmd.FLUSH:
      case Cmd.TRIM:
      case Cmd.CACHE:
      case Cmd.WRITE_ZEROES:
      case Cmd.BLOCK_STATUS:
        break;
      default:
        return { error: NbdErr.EINVAL, message: `unknown command ${h.type}` };
    }
    if (writes && exp.readOnly) {
      return { error: NbdErr.EPERM, message: `export '${exp.name}' is read-only` };
    }
    if (h.type === Cmd.TRIM && (exp.flags & TxFlag.SEND_TRIM) === 0) {
      return { error: NbdErr.EINVAL, message: `NBD_CMD_TRIM is not supported by export '${exp.name}'` };
    }
    if (h.type === Cmd.BLOCK_STATUS && (!this.structured || this.baseAllocationId === undefined)) {
      return {
        error: NbdErr.EINVAL,
        message: 'NBD_CMD_BLOCK_STATUS needs structured replies and base:allocation selected during the handshake',
      };
    }

    if ((h.flags & ~KNOWN_FLAGS) !== 0) {
      return { error: NbdErr.EINVAL, message: `unknown command flags 0x${h.flags.toString(16)}` };
    }
    if (h.flags & CmdFlag.NO_HOLE && h.type !== Cmd.WRITE_ZEROES) {
      return { error: NbdErr.EINVAL, message: `flag NO_HOLE is not valid on ${name()}` };
    }
    if (h.flags & CmdFlag.FAST_ZERO) {
      if (h.type !== Cmd.WRITE_ZEROES)
        return { error: NbdErr.EINVAL, message: `flag FAST_ZERO is not valid on ${name()}` };
      if ((exp.flags & TxFlag.SEND_FAST_ZERO) === 0) {
        return { error: NbdErr.EINVAL, message: `flag FAST_ZERO is not supported by export '${exp.name}'` };
      }
    }
    if (h.flags & CmdFlag.DF) {
      return { error: NbdErr.EINVAL, message: 'flag DF is not supported (the server never fragments reads)' };
    }
    if (h.flags & CmdFlag.REQ_ONE && h.type !== Cmd.BLOCK_STATUS) {
      return { error: NbdErr.EINVAL, message: `flag REQ_ONE is not valid on ${name()}` };
    }

    if (h.type === Cmd.FLUSH) {
      if (h.offset !== 0 || h.length !== 0) {
        return { error: NbdErr.EINVAL, message: 'NBD_CMD_FLUSH must have offset and length 0' };
      }
      return undefined;
    }
    if ((h.type === Cmd.READ || h.type === Cmd.WRITE) && h.length > exp.blockSize.max) {
      return {
        error: NbdErr.EINVAL,
        message: `${name()} of ${h.length} bytes exceeds the maximum block size ${exp.blockSize.max}`,
      };
    }
    const min = exp.blockSize.min;
    if (min > 1 && (h.offset % min !== 0 || h.length % min !== 0)) {
      return {
        error: NbdErr.EINVAL,
        message: `${name()} at ${h.offset} length ${h.length} is not aligned to the minimum block size ${min}`,
      };
    }
    if (h.offset + h.length > exp.size) {
      return {
        error: h.type === Cmd.WRITE || h.type === Cmd.WRITE_ZEROES ? NbdErr.ENOSPC : NbdErr.EINVAL,
        message: `${name()} at ${h.offset} length ${h.length} extends past the end of export '${exp.name}' (${exp.size} bytes)`,
      };
    }
    if (h.type === Cmd.BLOCK_STATUS && h.length === 0) {
      return { error: NbdErr.EINVAL, message: 'NBD_CMD_BLOCK_STATUS of length 0 has no extent to describe' };
    }
    return undefined;
  }

  // -------------------------------------------------------------------------
  // Execution and replies

  private dispatch(req: Request, payload: Buffer | undefined): void {
    if (req.type !== Cmd.READ) {
      void this.execute(req, payload);
      return;
    }
    const buf = this.readNow(req);
    if (buf !== null) void this.execute(req, payload, buf);
  }

  /**
   * A read the device can complete here and now (a cache hit, a page-cache
   * hit): replied and finished within this call, without a promise (null).
   * Otherwise the reply buffer it took, if any, for execute() to read into.
   */
  private readNow(req: Request): Buffer | undefined | null {
    const dev = this.exp.device;
    if (dev.readNow === undefined || req.length === 0) return undefined;
    const started = performance.now();
    const prefix = this.structured ? OFFSET_DATA_PREFIX : SIMPLE_REPLY_HEADER_SIZE;
    const buf = ioBuffers.acquire(prefix + req.length);
    if (!dev.readNow(buf.subarray(prefix), req.offset)) return buf;
    if (this.structured) writeOffsetDataPrefix(buf, req.cookie, req.offset, req.length);
    else writeSimpleReplyHeader(buf, 0, 0, req.cookie);
    this.send(buf, true);
    this.finished(req, started, true);
    return null;
  }

  /** Never rejects: every outcome becomes a reply (or, on a dead socket, nothing). */
  private async execute(req: Request, payload: Buffer | undefined, readBuf?: Buffer): Promise<void> {
    const dev = this.exp.device;
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    const started = performance.now();
    let ok = true;
    try {
      switch (req.type) {
        case Cmd.READ:
          await this.read(req, readBuf);
          return;
        case Cmd.WRITE:
          if (payload) {
            await dev.write(payload, req.offset, fua ? { fua } : undefined);
            // Only after success: a device that gave up on an I/O might still be reading the buffer.
            ioBuffers.release(payload);
          }
          break;
        case Cmd.FLUSH:
          await dev.flush();
          break;
        case Cmd.TRIM:
          if (req.length > 0) await dev.discard(req.offset, req.length);
          if (fua) await dev.flush();
          break;
        case Cmd.WRITE_ZEROES:
          if (req.length > 0) {
            await dev.writeZeroes(req.offset, req.length, {
              noHole: (req.flags & CmdFlag.NO_HOLE) !== 0,
              fastOnly: (req.flags & CmdFlag.FAST_ZERO) !== 0,
              fua,
            });
          }
          break;
        case Cmd.CACHE:
          await this.prefetch(req);
          break;
        case Cmd.BLOCK_STATUS:
          await this.blockStatus(req);
          return;
        default:
          throw new Error(`unexpected command ${req.type}`);
      }
      this.replyOk(req.cookie);
    } catch (err) {
      ok = false;
      this.failRequest(req, err);
    } finally {
      this.finished(req, started, ok);
    }
  }

  /** A request's end, whatever it was: its metrics, and its charge given back. */
  private finished(req: Request, started: number, ok: boolean): void {
    this.exp.metrics.observe(req.type, (performance.now() - started) / 1000, req.length, ok);
    this.inflight--;
    this.inflightBytes -= req.cost;
    this.maybeResume();
    this.finishIfIdle();
  }

  /** `buf`, when given, is a reply buffer of the right size already taken (readNow's). */
  private async read(req: Request, buf?: Buffer): Promise<void> {
    const dev = this.exp.device;
    if (this.structured && req.length === 0) {
      this.send(encodeNoneChunk(req.cookie));
      return;
    }
    // Read first, then send header and data together: an error is still reportable as a plain error reply.
    // On error the buffer is not recycled: a device that gave up on an I/O might still write into it.
    const prefix = this.structured ? OFFSET_DATA_PREFIX : SIMPLE_REPLY_HEADER_SIZE;
    buf ??= ioBuffers.acquire(prefix + req.length);
    if (req.length > 0) await dev.read(buf.subarray(prefix), req.offset);
    if (this.structured) writeOffsetDataPrefix(buf, req.cookie, req.offset, req.length);
    else writeSimpleReplyHeader(buf, 0, 0, req.cookie);
    this.send(buf, true);
  }

  /** NBD_CMD_CACHE: read the range through the device (which is what warms a cache) and drop the data. */
  private async prefetch(req: Request): Promise<void> {
    if (req.length === 0) return;
    const scratch = Buffer.allocUnsafe(Math.min(req.length, CACHE_PIECE));
    for (let done = 0; done < req.length && !this.closed;) {
      const n = Math.min(scratch.length, req.length - done);
      await this.exp.device.read(n === scratch.length ? scratch : scratch.subarray(0, n), req.offset + done);
      done += n;
    }
  }

  private async blockStatus(req: Request): Promise<void> {
    const extents = await this.exp.device.blockStatus(req.offset, req.length);
    const out: StatusDescriptor[] = [];
    let covered = 0;
    for (const e of extents) {
      if (e.length <= 0) continue;
      const flags = (e.hole ? State.HOLE : 0) | (e.zero ? State.ZERO : 0);
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += e.length;
      else out.push({ length: e.length, flags });
      covered += e.length;
    }
    if (out.length === 0 || covered !== req.length) {
      throw new Error(`device ${this.exp.device.name} described ${covered} of ${req.length} bytes`);
    }
    const oneOnly = (req.flags & CmdFlag.REQ_ONE) !== 0;
    const descriptors = out.slice(0, oneOnly ? 1 : MAX_EXTENTS);
    this.send(encodeBlockStatusChunk(req.cookie, this.baseAllocationId ?? 0, descriptors));
  }

  private failRequest(req: Request, err: unknown): void {
    const code = errorCode(err);
    let error = nbdErrorFromErrno(code);
    // ENOTSUP belongs to FAST_ZERO alone and EOVERFLOW to DF reads (proto.md "Error values").
    const fastZero = req.type === Cmd.WRITE_ZEROES && (req.flags & CmdFlag.FAST_ZERO) !== 0;
    if ((error === NbdErr.ENOTSUP && !fastZero) || error === NbdErr.EOVERFLOW) error = NbdErr.EIO;
    const message = `${commandName(req.type)} at ${req.offset} length ${req.length} failed: ${errorMessage(err)}`;
    if (error === NbdErr.ENOTSUP || error === NbdErr.ESHUTDOWN) log.debug(`${this.label}: ${message}`);
    else log.warn(`${this.label}: export '${this.exp.name}': ${message} (${code})`);
    this.sendError(req.cookie, error, message);
  }

  private sendError(cookie: bigint, error: NbdError, message: string): void {
    this.send(this.structured ? encodeErrorChunk(cookie, error, message) : encodeSimpleReply(error, cookie));
  }

  /**
   * A success reply without payload (a write, flush, trim...): 16 bytes put
   * into this turn's batch, which leaves as one buffer when the socket is
   * uncorked. One socket write a turn instead of a Buffer and a write (with
   * its bookkeeping in the stream) per reply. Replies may go in any order
   * (the client matches them by cookie), so the batch need not keep its place
   * among other replies.
   */
  private replyOk(cookie: bigint): void {
    if (this.closed || this.ended || this.socket.destroyed) return;
    this.corkForTurn();
    let batch = this.okBatch;
    if (!batch || this.okBatchUsed + SIMPLE_REPLY_HEADER_SIZE > batch.length) {
      this.flushOkBatch();
      // Small enough to come from Node's shared pool (allocUnsafe below 4 KiB): no fresh memory a turn.
      batch = this.okBatch = Buffer.allocUnsafe(OK_BATCH_BYTES);
    }
    writeSimpleReplyHeader(batch, this.okBatchUsed, 0, cookie);
    this.okBatchUsed += SIMPLE_REPLY_HEADER_SIZE;
  }

  private flushOkBatch(): void {
    const batch = this.okBatch;
    if (!batch) return;
    this.okBatch = undefined;
    if (this.okBatchUsed > 0 && !this.socket.destroyed) this.socket.write(batch.subarray(0, this.okBatchUsed));
    this.okBatchUsed = 0;
  }

  /** Replies completed in one turn of the event loop leave in one writev instead of a syscall each. */
  private corkForTurn(): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
  }

  /** Queue a reply; with `recycle`, the buffer goes back to the pool once the socket is done with it. */
  private send(buf: Buffer, recycle = false): void {
    if (this.closed || this.ended || this.socket.destroyed) return;
    this.corkForTurn();
    if (recycle) {
      this.socket.write(buf, (err) => {
        if (!err) ioBuffers.release(buf);
      });
    } else {
      this.socket.write(buf);
    }
  }

  private readonly uncork = (): void => {
    this.flushOkBatch();
    this.corked = false;
    this.socket.uncork();
  };

  // -------------------------------------------------------------------------
  // Flow control and the end of the connection

  private busy(): boolean {
    return (
      this.inflight >= this.opts.maxInflightRequests ||
      this.inflightBytes + this.socket.writableLength >= this.opts.maxInflightBytes
    );
  }

  private pause(): void {
    if (!this.paused) {
      this.paused = true;
      this.socket.pause();
    }
  }

  private maybeResume(): void {
    if (!this.paused || this.busy() || this.closed) return;
    this.paused = false;
    // Resume first: data events come asynchronously, so if the stash fills the bound again the pause below wins.
    this.socket.resume();
    const next = this.consuming ? undefined : this.stash.shift();
    if (next) this.consume(next);
    else this.checkEndOfInput();
  }

  /** A half-received WRITE that will never complete: give back its charge. */
  private releasePartialWrite(): void {
    const req = this.writeReq;
    if (!req) return;
    this.writeReq = undefined;
    this.payload = undefined;
    this.payloadHave = 0;
    this.inflight--;
    this.inflightBytes -= req.cost;
  }

  private finishIfIdle(): void {
    if (this.inflight > 0) return;
    if (this.closed) {
      this.settleIfDone();
      return;
    }
    if (this.ended || !(this.stopped || this.shuttingDown)) return;
    // Nothing in flight and nothing more to serve: close our side, keep draining the
    // client's (closing a socket with unread input would reset it and could lose our last replies).
    this.ended = true;
    this.stopped = true;
    this.stash = [];
    this.socket.resume();
    this.flushOkBatch();
    this.socket.end();
    void sleep(this.opts.endGraceMs, this.graceAbort.signal).then((elapsed) => {
      if (elapsed && !this.closed) {
        log.debug(`${this.label}: client did not close within ${this.opts.endGraceMs} ms; dropping it`);
        this.socket.destroy();
      }
    });
  }

  private settleIfDone(): void {
    if (this.closed && this.inflight === 0) this.resolveDone();
  }
}
