// An NBD client: the other end of server.ts, so that a remote export can be
// a backing or cache device (blockdev/nbd.ts) with socket I/O on the event
// loop, no thread pool and no FUSE.
//
// Handshake (fixed newstyle, proto.md "Option haggling"): client flags
// C_FIXED_NEWSTYLE and C_NO_ZEROES when offered; for nbds:// URIs
// NBD_OPT_STARTTLS first and the rest inside TLS (tls.ts); then
// STRUCTURED_REPLY, SET_META_CONTEXT base:allocation and GO asking for
// NBD_INFO_BLOCK_SIZE; a server without GO (ERR_UNSUP), or without fixed
// newstyle at all, gets EXPORT_NAME, as the spec allows. What the server
// advertises is obeyed: requests are split at its maximum payload and aligned
// to its minimum block size, and no command or flag is sent that it did not
// offer.
//
// Transmission: many requests in flight per connection (64 by default; more
// wait in a queue, which is bounded too), replies matched by cookie in any
// order, READ data (simple replies, or OFFSET_DATA / OFFSET_HOLE chunks in any
// order) copied straight from the socket into the caller's buffer. With
// NBD_FLAG_CAN_MULTI_CONN several connections share the load and a FLUSH goes
// to every one of them. A new request goes to the first connection with fewer
// than `spillAt` (8) requests on it, and only past that to the least loaded:
// one connection carries a light load as well as four, and a server pays for
// every connection it serves (nbdkit runs --threads workers per connection,
// each growing and zeroing its own request buffer on first use; spread evenly,
// 1 MiB sequential reads at QD8 kept landing on cold workers of four pools and
// ran at half the speed of one connection).
//
// A server that breaks the protocol (bad magic, a cookie we never sent or
// already answered, a chunk larger than its request allows, a chunk that does
// not fit the request) cannot be trusted with the stream any more: the
// connection is dropped, every request in flight on it fails with EIO and a
// message saying what the server did, and the client refuses further
// requests. Reconnecting to it would only repeat that.
//
// Outages. A connection that is merely lost (EOF or a reset, also in the
// middle of a reply; no reply bytes for requestTimeoutMs while requests are in
// flight; an ESHUTDOWN reply from a server going down) starts an outage: the
// requests it had in flight or queued are kept, not failed; the other
// connections take nothing new and finish what they have; new requests wait.
// The client reconnects with exponential backoff (100 ms doubling to 5 s,
// with jitter) for at most outageTimeoutMs (30 s by default). The new
// connections must negotiate the same size, flags and block sizes, or the
// client fails for good (a different disk behind the same name is not ours to
// write to). Then it re-sends the unflushed writes (below), then every request
// kept, reads, writes, trims, zeroes and FLUSHes alike: each is idempotent, and
// the outage only cost latency. Past the timeout the client fails for good:
// everything waiting fails with EIO, `failed` is set (the device reports
// itself gone) and nothing reconnects any more.
//
// Durability across a reconnect. A write acknowledged but not yet covered by
// a FLUSH may still be in the server's volatile cache (its own, or the page
// cache of a machine that reboots); if the connection was lost because the
// server restarted, it may be gone, though our callers were told it was
// done, and nothing they do later would tell them (a later FLUSH would succeed
// on the new server). So the client keeps every acknowledged write until a
// FLUSH covers it (unflushed.ts: a copy of each write, zeroes and trims as
// ranges, in acknowledgement order, folded to the newest content at replay)
// and, after reconnecting and before anything else, writes it again. A
// FLUSH in flight at the loss is re-sent after that, so it covers the
// restored writes. Memory is bounded: past autoFlushBytes (4 MiB; an
// overwritten range counts once per write) or autoFlushEntries the client
// sends a FLUSH of its own, and at maxUnflushedBytes or maxUnflushedEntries
// new writes wait for it. (The alternative, failing the next FLUSH once with EIO
// like a sticky fdatasync error, would lose nothing silently either, but
// turns every server restart into an I/O error for our clients; the replay
// hides it.) Servers without SEND_FLUSH have no volatile cache: nothing is kept.
//
// A request is settled exactly once and its buffer is never touched after.

import { createConnection, type Socket } from 'node:net';
import { IoError, type Extent } from '../blockdev/types.ts';
import { aborted, errorMessage, rejectWith, sleep } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import {
  decodeBlockStatusPayload,
  decodeErrorPayload,
  decodeExportNameReply,
  decodeGreeting,
  decodeInfoReply,
  decodeOffsetHolePayload,
  decodeOptionReplyHeader,
  decodeRepMetaContext,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOptionRequest,
  encodeRequestHeader,
  encodeSmallCookieRequest,
  type BlockSizes,
  type StatusDescriptor,
} from './codec.ts';
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  CmdFlag,
  commandName,
  DEFAULT_MAX_PAYLOAD,
  errnoFromNbdError,
  EXPORT_NAME_PADDING,
  EXPORT_NAME_REPLY_SIZE,
  GREETING_SIZE,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  isErrorChunk,
  isErrorReply,
  MAX_STATUS_DESCRIPTORS,
  MAX_STRING_BYTES,
  NBD_MAGIC,
  NbdErr,
  nbdErrorName,
  OLDSTYLE_MAGIC,
  OPTION_REPLY_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  Opt,
  optionName,
  Rep,
  ReplyFlag,
  ReplyType,
  replyTypeName,
  SIMPLE_REPLY_HEADER_SIZE,
  SIMPLE_REPLY_MAGIC,
  State,
  STRUCTURED_REPLY_HEADER_SIZE,
  STRUCTURED_REPLY_MAGIC,
  TxFlag,
} from './protocol.ts';
import { ConnectionClosed, SocketReader } from './reader.ts';
import { resolveTls, TlsConfigError, upgrade, type TlsConfig } from './tls.ts';
import { UnflushedLog } from './unflushed.ts';
import { describeTransport, parseNbdUri, type NbdTransport, type NbdUri } from './uri.ts';

export interface NbdClientOptions {
  /** Connections to open when the server advertises CAN_MULTI_CONN (else one). Default 4. */
  connections?: number;
  /** Requests in flight per connection; more wait in the queue. Default 64. */
  maxInflight?: number;
  /**
   * With several connections, a connection takes new requests until it has
   * this many in flight or queued before the next one takes any; when every
   * one has that many, the least loaded takes them. Default 8 (at most half
   * of what qemu-nbd, 16 per client, or nbdkit's default 16 threads serve at
   * once on a connection). 1 spreads every request (least loaded first).
   */
  spillAt?: number;
  /** READ/WRITE payload bytes in flight per connection (one request may exceed it alone). Default 64 MiB. */
  maxInflightBytes?: number;
  /** Requests waiting for a slot, over all connections; past it requests fail with ENOMEM. Default 16384. */
  maxQueued?: number;
  /** Negotiate structured replies (holes, error messages, block status). Default true. */
  structuredReplies?: boolean;
  /** Select base:allocation for blockStatus(). Default true. */
  blockStatus?: boolean;
  /** Time allowed for connecting and the handshake. Default 30 s. */
  handshakeTimeoutMs?: number;
  /** After NBD_CMD_DISC, how long the server has to close before the socket is destroyed. Default 2 s. */
  closeTimeoutMs?: number;
  /**
   * How long a lost server is reconnected to before everything waiting fails
   * with EIO and the client gives up for good; 0 never reconnects (a lost
   * connection fails its requests at once). Default 30 s (URI: outage-timeout).
   */
  outageTimeoutMs?: number;
  /**
   * A connection with requests in flight that receives nothing for this long
   * is taken as lost (a hung server, a dead network path TCP has not noticed).
   * 0: no limit. Default 30 s, as the Linux nbd driver (URI: request-timeout).
   */
  requestTimeoutMs?: number;
  /**
   * Acknowledged writes kept until a FLUSH covers them, for replay after a
   * reconnect: at the limit new writes wait for the client's own flush
   * (autoFlushBytes). Default 64 MiB.
   */
  maxUnflushedBytes?: number;
  /**
   * Past this many bytes of acknowledged, unflushed writes (or half of
   * maxUnflushedBytes, if less) the client sends a FLUSH of its own, so the
   * log stays small. Default 4 MiB: the log's copies then stay in memory the
   * CPU has touched recently, where 32 MiB of them cost a proxied write
   * about 10 % of its rate (docs/performance.md, "The unflushed log's
   * size"). One such flush at a time; writes go on while it runs.
   */
  autoFlushBytes?: number;
  /**
   * The same bounds counted in entries (each write, zero or trim is one, of
   * any size): many small writes, or trims and zeroes that hold no data, are
   * bounded too. Past autoFlushEntries (16384) the client flushes by itself,
   * at maxUnflushedEntries (131072) new writes, zeroes and trims wait.
   */
  autoFlushEntries?: number;
  maxUnflushedEntries?: number;
}

const DEFAULTS: Required<NbdClientOptions> = {
  connections: 4,
  maxInflight: 64,
  spillAt: 8,
  maxInflightBytes: 64 * 1024 * 1024,
  maxQueued: 16384,
  structuredReplies: true,
  blockStatus: true,
  handshakeTimeoutMs: 30_000,
  closeTimeoutMs: 2_000,
  outageTimeoutMs: 30_000,
  requestTimeoutMs: 30_000,
  maxUnflushedBytes: 64 * 1024 * 1024,
  autoFlushBytes: 4 * 1024 * 1024,
  autoFlushEntries: 16_384,
  maxUnflushedEntries: 131_072,
};

/** The first wait between reconnect attempts; it doubles up to RECONNECT_MAX_MS. */
const RECONNECT_FIRST_MS = 100;
const RECONNECT_MAX_MS = 5_000;
/**
 * After a reconnect, a loss before the first reply continues the outage (and
 * its backoff) for this long; later, or after a reply, a loss is a new outage.
 * Bounded so that a connection left idle for hours after a reconnect does not
 * inherit an outage that ended long ago.
 */
const PROBATION_MS = 10_000;

/** What the handshake established, the same on every connection of a client. */
export interface NbdExportInfo {
  exportName: string;
  size: number;
  /** The transmission flags (TxFlag). */
  flags: number;
  /** NBD_INFO_BLOCK_SIZE as the server sent it, if it did. */
  advertisedBlockSize: BlockSizes | undefined;
  structuredReplies: boolean;
  /** The context id of base:allocation, if the server selected it. */
  baseAllocationId: number | undefined;
  /** How transmission was entered: NBD_OPT_GO, or NBD_OPT_EXPORT_NAME for servers without GO. */
  via: 'go' | 'export-name';
}

/**
 * Why a handshake failed: the server broke the protocol ('violation'), said
 * no ('refused'), the connection failed or timed out ('transport'), or TLS
 * did not authenticate ('tls'). Reconnecting retries only refusals and
 * transport failures: the others would fail the same way again.
 */
export type HandshakeFailure = 'violation' | 'refused' | 'transport' | 'tls';

/** The server broke the protocol during the handshake, or refused us. */
export class NbdHandshakeError extends Error {
  readonly kind: HandshakeFailure;
  constructor(message: string, options?: { cause?: unknown; kind?: HandshakeFailure }) {
    super(message, options);
    this.name = 'NbdHandshakeError';
    this.kind = options?.kind ?? 'violation';
  }
}

/** Option replies we read into memory; a longer one is a broken server. */
const MAX_OPTION_REPLY = 64 * 1024;
/** Replies to one option; a server that sends more is looping. */
const MAX_OPTION_REPLIES = 4096;
/** TRIM, WRITE_ZEROES and BLOCK_STATUS carry no payload but a 32-bit length: they go in pieces of this (a multiple of every legal minimum block size). */
const NO_PAYLOAD_PIECE = 1024 * 1024 * 1024;
/** An error chunk: error, message length, message (at most a spec string) and an optional offset. */
const MAX_ERROR_CHUNK = 6 + MAX_STRING_BYTES + 8;
const MAX_STATUS_CHUNK = 4 + 8 * MAX_STATUS_DESCRIPTORS;
const COOKIE_LIMIT = 2 ** 32;
const EMPTY = Buffer.alloc(0);

const isPowerOfTwo = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

// ---------------------------------------------------------------------------
// Handshake

interface OptionReply {
  type: number;
  data: Buffer;
}

/** Send an option and read its replies up to the final one (ACK or an error). */
async function haggle(socket: Socket, reader: SocketReader, option: number, data?: Buffer): Promise<OptionReply[]> {
  socket.write(encodeOptionRequest(option, data));
  const name = optionName(option);
  const replies: OptionReply[] = [];
  for (;;) {
    const h = decodeOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_SIZE));
    if (h.magic !== OPTION_REPLY_MAGIC) {
      throw new NbdHandshakeError(`the server answered ${name} with bad magic 0x${h.magic.toString(16)}`);
    }
    if (h.option !== option) {
      throw new NbdHandshakeError(`the server answered ${name} with a reply to ${optionName(h.option)}`);
    }
    if (h.length > MAX_OPTION_REPLY) {
      throw new NbdHandshakeError(
        `the server answered ${name} with a ${h.length}-byte reply (at most ${MAX_OPTION_REPLY})`,
      );
    }
    replies.push({ type: h.type, data: h.length > 0 ? await reader.read(h.length) : Buffer.alloc(0) });
    if (h.type === Rep.ACK || isErrorReply(h.type)) return replies;
    if (replies.length >= MAX_OPTION_REPLIES) {
      throw new NbdHandshakeError(`the server sent more than ${MAX_OPTION_REPLIES} replies to ${name}`);
    }
  }
}

function refusal(reply: OptionReply): string {
  const text = reply.data.toString('utf8', 0, Math.min(reply.data.length, MAX_STRING_BYTES));
  return `${replyTypeName(reply.type)}${text === '' ? '' : `: ${text}`}`;
}

function checkBlockSizes(s: BlockSizes): void {
  if (!isPowerOfTwo(s.min) || s.min > 65536) {
    throw new NbdHandshakeError(`the server's minimum block size ${s.min} is not a power of two up to 64 KiB`);
  }
  if (s.max < s.min) {
    throw new NbdHandshakeError(`the server's maximum block size ${s.max} is below its minimum ${s.min}`);
  }
}

/** The socket and reader of a handshake: STARTTLS swaps both for the TLS socket's. */
interface Wire {
  socket: Socket;
  reader: SocketReader;
}

const isErrno = (err: unknown): boolean =>
  err !== null &&
  typeof err === 'object' &&
  'code' in err &&
  typeof err.code === 'string' &&
  /^E[A-Z]+$/.test(err.code);

/** NBD_OPT_STARTTLS, then the TLS handshake on the same socket; `wire` then carries the TLS socket. */
async function startTls(wire: Wire, tls: TlsConfig, signal: AbortSignal | undefined): Promise<void> {
  const r = await haggle(wire.socket, wire.reader, Opt.STARTTLS);
  const last = r[r.length - 1];
  if (last?.type !== Rep.ACK) {
    throw new NbdHandshakeError(
      `the server refused NBD_OPT_STARTTLS (${last ? refusal(last) : 'no reply'}): it does not offer TLS`,
      { kind: 'refused' },
    );
  }
  const { leftover } = wire.reader.detach();
  if (leftover.some((b) => b.length > 0)) {
    throw new NbdHandshakeError('the server sent bytes after acknowledging NBD_OPT_STARTTLS, before the TLS handshake');
  }
  try {
    wire.socket = await upgrade(wire.socket, tls, signal);
  } catch (err) {
    throw new NbdHandshakeError(`the TLS handshake failed (${tls.describe}): ${errorMessage(err)}`, {
      cause: err,
      kind: isErrno(err) ? 'transport' : 'tls',
    });
  }
  wire.reader = new SocketReader(wire.socket, { highWaterMark: 1024 * 1024 });
}

async function negotiate(
  wire: Wire,
  exportName: string,
  opts: Required<NbdClientOptions>,
  tls: TlsConfig | undefined,
  signal: AbortSignal | undefined,
): Promise<NbdExportInfo> {
  const g = decodeGreeting(await wire.reader.read(GREETING_SIZE));
  if (g.magic !== NBD_MAGIC) {
    throw new NbdHandshakeError(`not an NBD server: its greeting starts 0x${g.magic.toString(16)}, not NBDMAGIC`);
  }
  if (g.optMagic === OLDSTYLE_MAGIC) {
    throw new NbdHandshakeError(
      'the server speaks the oldstyle handshake, which has no export names and is not supported; run it in newstyle mode',
    );
  }
  if (g.optMagic !== IHAVEOPT) {
    throw new NbdHandshakeError(`bad second magic 0x${g.optMagic.toString(16)} in the server's greeting`);
  }
  const fixed = (g.handshakeFlags & HandshakeFlag.FIXED_NEWSTYLE) !== 0;
  const noZeroes = (g.handshakeFlags & HandshakeFlag.NO_ZEROES) !== 0;
  if (tls && !fixed) {
    throw new NbdHandshakeError(
      'the server speaks non-fixed newstyle, which has no NBD_OPT_STARTTLS: it cannot do TLS',
    );
  }
  wire.socket.write(
    encodeClientFlags((fixed ? ClientFlag.C_FIXED_NEWSTYLE : 0) | (noZeroes ? ClientFlag.C_NO_ZEROES : 0)),
  );
  // STARTTLS before any other option (proto.md): what was negotiated in the clear would be forgotten anyway.
  if (tls) await startTls(wire, tls, signal);
  const { socket, reader } = wire;
  const tlsRequired = (reply: OptionReply | undefined): NbdHandshakeError | undefined =>
    reply?.type === Rep.ERR_TLS_REQD
      ? new NbdHandshakeError(
          `the server requires TLS (${refusal(reply)}): use an nbds:// or nbds+unix:// URI with tls-certificates=DIR or tls-psk-file=FILE`,
        )
      : undefined;

  let structuredReplies = false;
  let baseAllocationId: number | undefined;
  if (fixed) {
    if (opts.structuredReplies) {
      const r = await haggle(socket, reader, Opt.STRUCTURED_REPLY);
      const needTls = tlsRequired(r[r.length - 1]);
      if (needTls) throw needTls;
      // Any other refusal just means simple replies (ERR_UNSUP is the usual one).
      structuredReplies = r[r.length - 1]?.type === Rep.ACK;
    }
    if (structuredReplies && opts.blockStatus) {
      const r = await haggle(
        socket,
        reader,
        Opt.SET_META_CONTEXT,
        encodeMetaContextRequest({ exportName, queries: [BASE_ALLOCATION] }),
      );
      if (r[r.length - 1]?.type === Rep.ACK) {
        for (const reply of r) {
          if (reply.type !== Rep.META_CONTEXT) continue;
          const ctx = decodeRepMetaContext(reply.data);
          if (ctx.name === BASE_ALLOCATION) baseAllocationId = ctx.id;
        }
      }
    }
    const r = await haggle(
      socket,
      reader,
      Opt.GO,
      encodeInfoRequest({ name: exportName, requests: [Info.BLOCK_SIZE] }),
    );
    const last = r[r.length - 1];
    if (last?.type === Rep.ACK) {
      let size: number | undefined;
      let flags = 0;
      let advertisedBlockSize: BlockSizes | undefined;
      for (const reply of r) {
        if (reply.type !== Rep.INFO) continue;
        const info = decodeInfoReply(reply.data);
        if ('size' in info) {
          size = info.size;
          flags = info.flags;
        } else if ('sizes' in info) {
          checkBlockSizes(info.sizes);
          advertisedBlockSize = info.sizes;
        }
      }
      if (size === undefined) throw new NbdHandshakeError('the server accepted NBD_OPT_GO without NBD_INFO_EXPORT');
      return { exportName, size, flags, advertisedBlockSize, structuredReplies, baseAllocationId, via: 'go' };
    }
    if (last?.type !== Rep.ERR_UNSUP) {
      const needTls = tlsRequired(last);
      if (needTls) throw needTls;
      const hint = last?.type === Rep.ERR_UNKNOWN ? ' (check the export name in the URI)' : '';
      throw new NbdHandshakeError(
        `the server refused export '${exportName}': ${last ? refusal(last) : 'no reply'}${hint}`,
        // A server coming back up may not serve the export yet: worth retrying while reconnecting.
        { kind: last && isErrorReply(last.type) ? 'refused' : 'violation' },
      );
    }
    // A server without NBD_OPT_GO: EXPORT_NAME below, as the spec allows.
  }

  socket.write(encodeOptionRequest(Opt.EXPORT_NAME, Buffer.from(exportName, 'utf8')));
  let reply: Buffer;
  try {
    reply = await reader.read(EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_PADDING));
  } catch (err) {
    if (!(err instanceof ConnectionClosed)) throw err;
    throw new NbdHandshakeError(
      `the server closed the connection after NBD_OPT_EXPORT_NAME: it has no export named '${exportName}' or refused it`,
      { cause: err, kind: 'refused' },
    );
  }
  const { size, flags } = decodeExportNameReply(reply);
  return {
    exportName,
    size,
    flags,
    advertisedBlockSize: undefined,
    structuredReplies,
    baseAllocationId,
    via: 'export-name',
  };
}

/** Where a connection's incoming bytes go once it is in transmission. */
interface ReadSink {
  /** The buffer the next read fills. */
  readBuffer(): Buffer;
  /** `n` bytes arrived in `buf`, the buffer readBuffer() returned last. */
  received(n: number, buf: Buffer): void;
}

/** Reads at most this much into the reused scratch buffer: many small replies per read. */
const SCRATCH_SIZE = 64 * 1024;
/** READ data at least this long is read straight into the caller's buffer; shorter data comes via the scratch. */
const DIRECT_READ_MIN = 16 * 1024;

/**
 * Open the socket with Node's `onread`, so that each read fills a buffer we
 * choose: in transmission the connection points reads of READ data straight
 * at the caller's buffer (no staging buffer per read and no copy), and
 * everything else at one reused scratch buffer. During the handshake the
 * bytes are copied out and emitted as 'data' for the SocketReader. A socket
 * that will carry TLS is opened plainly: the TLS socket takes over its reads,
 * decrypting into buffers of its own (open() forwards them to the sink).
 */
function connectSocket(
  transport: NbdTransport,
  direct: boolean,
): { socket: Socket; route: { sink: ReadSink | undefined } } {
  const route: { sink: ReadSink | undefined } = { sink: undefined };
  const tcp = { noDelay: true };
  if (!direct) {
    const socket =
      transport.kind === 'unix'
        ? createConnection({ path: transport.path })
        : createConnection({ host: transport.host, port: transport.port, ...tcp });
    return { socket, route };
  }
  const scratch = Buffer.allocUnsafe(SCRATCH_SIZE);
  const onread = {
    buffer: (): Buffer => route.sink?.readBuffer() ?? scratch,
    callback: (n: number, buf: Uint8Array): boolean => {
      if (route.sink) route.sink.received(n, buf as Buffer);
      else socket.emit('data', Buffer.from(buf.subarray(0, n)));
      return true;
    },
  };
  const socket =
    transport.kind === 'unix'
      ? createConnection({ path: transport.path, onread })
      : createConnection({ host: transport.host, port: transport.port, ...tcp, onread });
  return { socket, route };
}

interface Opened {
  socket: Socket;
  route: { sink: ReadSink | undefined };
  info: NbdExportInfo;
  /** Bytes that arrived with the end of the handshake, for the transmission parser. */
  leftover: Buffer[];
}

/** Where to connect and how: the same for every connection of a client and every reconnect. */
interface Target {
  transport: NbdTransport;
  exportName: string;
  tls: TlsConfig | undefined;
}

/**
 * Connect and run the handshake; resolves with the socket in transmission
 * and what was negotiated. `signal` cuts it short (a reconnect given up).
 */
async function open(target: Target, opts: Required<NbdClientOptions>, signal?: AbortSignal): Promise<Opened> {
  const { socket, route } = connectSocket(target.transport, target.tls === undefined);
  const wire: Wire = { socket, reader: new SocketReader(socket, { highWaterMark: 1024 * 1024 }) };
  const stop = (err: Error): void => {
    wire.reader.fail(err);
    wire.socket.destroy();
    socket.destroy();
  };
  const timer = setTimeout(() => {
    stop(new NbdHandshakeError(`no NBD handshake within ${opts.handshakeTimeoutMs} ms`, { kind: 'transport' }));
  }, opts.handshakeTimeoutMs);
  const onAbort = (): void => {
    stop(new NbdHandshakeError('the connection attempt was abandoned', { kind: 'transport' }));
  };
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    if (signal?.aborted) onAbort();
    const info = await negotiate(wire, target.exportName, opts, target.tls, signal);
    const { leftover, paused } = wire.reader.detach();
    if (wire.socket !== socket) {
      // TLS: decrypted data arrives as 'data' events; the connection parses it like any other chunk.
      const tlsSocket = wire.socket;
      tlsSocket.on('data', (chunk: Buffer) => {
        route.sink?.received(chunk.length, chunk);
      });
    }
    if (paused) wire.socket.resume();
    return { socket: wire.socket, route, info, leftover };
  } catch (err) {
    wire.socket.destroy();
    socket.destroy();
    if (err instanceof ConnectionClosed) {
      // The reader words a refused connect as a failed connection; name the real cause (ENOENT, ECONNREFUSED).
      const what =
        err.cause instanceof Error ? err.cause.message : 'the server closed the connection during the handshake';
      // With TLS 1.3 the server checks a client certificate after our side of the handshake is done: its refusal is a reset here.
      const afterTls =
        wire.socket !== socket
          ? ` right after the TLS handshake (${target.tls?.describe ?? 'TLS'}): the server may have refused our credentials`
          : '';
      throw new NbdHandshakeError(`${what}${afterTls}`, { cause: err, kind: 'transport' });
    }
    throw err;
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener('abort', onAbort);
  }
}

/** Do two handshakes describe the same export, as far as requests depend on it? */
function sameExport(a: NbdExportInfo, b: NbdExportInfo): string | undefined {
  if (a.size !== b.size) return `its size changed from ${a.size} to ${b.size} bytes`;
  if (a.flags !== b.flags)
    return `its transmission flags changed from 0x${a.flags.toString(16)} to 0x${b.flags.toString(16)}`;
  if (JSON.stringify(a.advertisedBlockSize) !== JSON.stringify(b.advertisedBlockSize)) {
    return `its block sizes changed from ${JSON.stringify(a.advertisedBlockSize)} to ${JSON.stringify(b.advertisedBlockSize)}`;
  }
  if (a.structuredReplies !== b.structuredReplies) return 'structured replies were negotiated differently';
  // The context id may differ per connection (each connection parses with its own); whether there is one may not.
  if ((a.baseAllocationId === undefined) !== (b.baseAllocationId === undefined)) {
    return 'base:allocation was negotiated differently';
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// Requests

interface Request {
  type: number;
  flags: number;
  offset: number;
  length: number;
  /** READ: where the data goes; WRITE: the payload. */
  buf: Buffer | undefined;
  cost: number;
  cookie: number;
  /** First error chunk (or simple error) of the reply. */
  error: { value: number; message: string } | undefined;
  /** The reply came as structured chunks (so a simple reply for it is a violation). */
  chunked: boolean;
  /** READ with structured replies: the [start, end) ranges (relative to offset) chunks have filled, flattened. */
  filled: number[] | undefined;
  status: StatusDescriptor[] | undefined;
  settled: boolean;
  /**
   * The client's own: a write, zero or trim replayed from the unflushed log after a reconnect. Never kept
   * across a loss (the log makes it again), never logged, never held. (The client's own FLUSHes, which bound
   * the log, are ordinary requests: kept across a loss and sent again, they cover the replay.)
   */
  internal: boolean;
  resolve: () => void;
  reject: (err: Error) => void;
}

/** A request lost with its connection is sent again: forget what the lost reply had delivered. */
function rearm(req: Request): void {
  req.cookie = 0;
  req.error = undefined;
  req.chunked = false;
  req.filled = undefined;
  req.status = undefined;
}

/** An internal request's connection was lost: a transient failure, retried with the reconnect. */
class ConnectionLost extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConnectionLost';
  }
}

function newRequest(
  type: number,
  flags: number,
  offset: number,
  length: number,
  buf: Buffer | undefined,
): { req: Request; done: Promise<void> } {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const done = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  const req: Request = {
    type,
    flags,
    offset,
    length,
    buf,
    cost: type === Cmd.READ || type === Cmd.WRITE ? length : 0,
    cookie: 0,
    error: undefined,
    chunked: false,
    filled: undefined,
    status: undefined,
    settled: false,
    internal: false,
    resolve,
    reject,
  };
  return { req, done };
}

/** Resolves when `p` settles or `signal` aborts, leaving no listener behind. */
async function untilAborted(p: Promise<unknown>, signal: AbortSignal): Promise<void> {
  if (signal.aborted) return;
  let onAbort: (() => void) | undefined;
  try {
    await Promise.race([
      p,
      new Promise<void>((resolve) => {
        const listener = (): void => {
          resolve();
        };
        onAbort = listener;
        signal.addEventListener('abort', listener, { once: true });
      }),
    ]);
  } finally {
    if (onAbort) signal.removeEventListener('abort', onAbort);
  }
}

/** Settle a request once. The caller owns its buffer again: drop our reference so nothing here can touch it. */
function settleOnce(req: Request, err?: Error): void {
  if (req.settled) return;
  req.settled = true;
  req.buf = undefined;
  if (err) req.reject(err);
  else req.resolve();
}

/** A reconnect found a different export under the same name. */
class ExportChanged extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ExportChanged';
  }
}

function describe(req: Request): string {
  return req.type === Cmd.FLUSH ? 'FLUSH' : `${commandName(req.type)} at ${req.offset} length ${req.length}`;
}

/** Reply parser states. */
const Parse = {
  /** Waiting for a reply header (simple or structured). */
  Header: 0,
  /** Copying READ data into the request's buffer. */
  Data: 1,
  /** Collecting a chunk payload (or an OFFSET_DATA chunk's offset) into `payload`. */
  Payload: 2,
} as const;
type ParseState = (typeof Parse)[keyof typeof Parse];

interface ConnectionOwner {
  readonly label: string;
  /** Lost connections hand their requests back (onLost) instead of failing them. */
  readonly retry: boolean;
  /** The connection settled a request (`replied`: the server answered it) or finished draining: queued work may move. */
  onProgress(conn: Connection, replied: boolean): void;
  /**
   * The server broke the protocol: the connection failed its requests in
   * flight with `err`. With retry, `unsent` (queued, never sent: nothing of the
   * server's touched them) are the owner's to keep; without, they failed too.
   */
  onFailure(conn: Connection, err: IoError, unsent: Request[]): void;
  /** The connection was lost (retry only): `reqs` were in flight or queued on it, rearmed and not settled. */
  onLost(conn: Connection, reqs: Request[], why: string): void;
  /** `req` got ESHUTDOWN: true if the owner took it back to send again (it is not settled), false to fail it. */
  onShutdown(conn: Connection, req: Request): boolean;
  /** `req` (a WRITE, TRIM or WRITE_ZEROES) succeeded; called before it settles, while its buffer is still the caller's. */
  onAck(req: Request): void;
}

/** One socket in transmission. */
class Connection implements ReadSink {
  readonly id: number;
  readonly info: NbdExportInfo;
  private readonly socket: Socket;
  private readonly owner: ConnectionOwner;
  private readonly opts: Required<NbdClientOptions>;
  private readonly label: string;

  private readonly inflight = new Map<number, Request>();
  private inflightBytes = 0;
  /** Requests not yet sent, oldest first from queueHead (slots before it are spent). */
  private queue: (Request | undefined)[] = [];
  private queueHead = 0;
  private nextCookie = 1;
  private corked = false;
  /** Requests sent, by command name. */
  readonly sent: Record<string, number> = {};

  /** open: takes requests; draining: finishes what it has, then disconnects; then closed or failed. */
  state: 'open' | 'draining' | 'closed' | 'failed' = 'open';
  failure: IoError | undefined;
  private discSent = false;
  private closeTimer: NodeJS.Timeout | undefined;
  private resolveClosed!: () => void;
  readonly closed: Promise<void>;

  // Reply parser.
  private parse: ParseState = Parse.Header;
  private readonly header = Buffer.alloc(STRUCTURED_REPLY_HEADER_SIZE);
  private headerHave = 0;
  /** The request whose reply is being parsed (Data, Payload). */
  private current: Request | undefined;
  private chunkFlags = 0;
  private chunkType = 0;
  private dataAt = 0;
  private dataLeft = 0;
  private payload: Buffer = Buffer.alloc(0);
  private payloadHave = 0;
  /** For OFFSET_DATA: the chunk's data length once its offset is read. */
  private chunkDataLength = 0;
  private readonly scratch = Buffer.allocUnsafe(SCRATCH_SIZE);
  /** The request whose buffer readBuffer() handed to the socket for the next read, if any. */
  private direct: Request | undefined;

  constructor(id: number, opened: Opened, owner: ConnectionOwner, opts: Required<NbdClientOptions>) {
    const { socket, info, leftover } = opened;
    this.id = id;
    this.socket = socket;
    this.info = info;
    this.owner = owner;
    this.opts = opts;
    this.label = owner.label;
    this.closed = new Promise<void>((resolve) => {
      this.resolveClosed = resolve;
    });
    opened.route.sink = this;
    socket.on('end', this.onEnd);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
    socket.on('timeout', this.onTimeout);
    for (const chunk of leftover) this.onData(chunk);
    if (socket.destroyed) this.onClose();
  }

  /** Requests in flight plus waiting: how loaded this connection is. */
  get load(): number {
    return this.inflight.size + this.queue.length - this.queueHead;
  }

  get queued(): number {
    return this.queue.length - this.queueHead;
  }

  /** Open, below `spillAt` requests, and able to send `req` at once (nothing queued ahead of it). */
  hasRoom(req: Request, spillAt: number): boolean {
    return this.state === 'open' && this.load < spillAt && this.queued === 0 && this.canSend(req);
  }

  submit(req: Request): void {
    if (this.queued === 0 && this.canSend(req)) this.send(req);
    else this.queue.push(req);
  }

  /** Stop taking requests; finish those in flight and queued, then disconnect. */
  drain(): void {
    if (this.state !== 'open') return;
    this.state = 'draining';
    this.maybeDisconnect();
  }

  /** Take back the requests waiting here (not yet sent), oldest first. */
  takeQueued(): Request[] {
    const waiting: Request[] = [];
    for (const req of this.queue.slice(this.queueHead)) if (req) waiting.push(req);
    this.queue = [];
    this.queueHead = 0;
    this.maybeDisconnect();
    return waiting;
  }

  /** Fail the requests waiting here (not yet sent) with `err`. */
  rejectQueued(err: IoError): void {
    const waiting = this.queue.slice(this.queueHead);
    this.queue = [];
    this.queueHead = 0;
    for (const req of waiting) if (req) this.settle(req, err);
    this.maybeDisconnect();
  }

  /** Drop the connection: everything in flight and queued fails with EIO saying why. */
  fail(reason: string): void {
    if (this.state === 'failed' || this.state === 'closed') return;
    const unsent: Request[] = [];
    for (const req of this.queue.slice(this.queueHead)) if (req) unsent.push(req);
    const failing = this.inflight.size + (this.owner.retry ? 0 : unsent.length);
    const err = new IoError(
      'EIO',
      `${this.label}: ${reason}` + (failing > 0 ? `; ${failing} request(s) on this connection failed` : ''),
    );
    this.state = 'failed';
    this.failure = err;
    this.current = undefined;
    this.direct = undefined;
    this.socket.destroy();
    const reqs = [...this.inflight.values()];
    this.inflight.clear();
    this.inflightBytes = 0;
    this.queue = [];
    this.queueHead = 0;
    // A replayed write is made again after the next reconnect: for it a broken connection is a lost one,
    // not a refusal (a replay failing with EIO would fail the client for good).
    for (const req of reqs) this.settle(req, req.internal && this.owner.retry ? new ConnectionLost(err.message) : err);
    if (!this.owner.retry) {
      for (const req of unsent) this.settle(req, err);
      unsent.length = 0;
    }
    this.owner.onFailure(this, err, unsent);
  }

  private canSend(req: Request): boolean {
    if (this.state === 'failed' || this.state === 'closed' || this.discSent) return false;
    if (this.inflight.size >= this.opts.maxInflight) return false;
    return this.inflight.size === 0 || this.inflightBytes + req.cost <= this.opts.maxInflightBytes;
  }

  private send(req: Request): void {
    let cookie = this.nextCookie;
    while (this.inflight.has(cookie)) cookie = cookie + 1 >= COOKIE_LIMIT ? 1 : cookie + 1;
    this.nextCookie = cookie + 1 >= COOKIE_LIMIT ? 1 : cookie + 1;
    req.cookie = cookie;
    this.inflight.set(cookie, req);
    this.inflightBytes += req.cost;
    // The silence limit runs while anything is in flight; any bytes received reset it (Node's socket timeout).
    if (this.inflight.size === 1 && this.opts.requestTimeoutMs > 0) this.socket.setTimeout(this.opts.requestTimeoutMs);
    const name = commandName(req.type);
    this.sent[name] = (this.sent[name] ?? 0) + 1;
    // Requests issued in one turn of the event loop leave in one writev.
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    this.socket.write(encodeSmallCookieRequest(req.type, req.flags, cookie, req.offset, req.length));
    if (req.type === Cmd.WRITE && req.buf && req.length > 0) this.socket.write(req.buf);
  }

  private readonly uncork = (): void => {
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  /** Send what the queue holds while there is room. */
  pump(): void {
    while (this.queueHead < this.queue.length) {
      const req = this.queue[this.queueHead];
      if (!req || !this.canSend(req)) break;
      this.queue[this.queueHead] = undefined;
      this.queueHead++;
      this.send(req);
    }
    if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.queueHead);
      this.queueHead = 0;
    }
    this.maybeDisconnect();
  }

  private maybeDisconnect(): void {
    if (this.state !== 'draining' || this.discSent || this.inflight.size > 0 || this.queued > 0) return;
    this.discSent = true;
    if (!this.socket.destroyed) {
      this.socket.write(encodeRequestHeader({ type: Cmd.DISC, cookie: 0n, offset: 0, length: 0 }));
      this.socket.end();
    }
    this.closeTimer = setTimeout(() => {
      log.debug(`${this.label}: connection ${this.id}: the server did not close after NBD_CMD_DISC; dropping it`);
      this.socket.destroy();
    }, this.opts.closeTimeoutMs);
  }

  private settle(req: Request, err?: Error): void {
    settleOnce(req, err);
  }

  /** The reply to `req` is complete. */
  private finish(req: Request): void {
    this.current = undefined;
    // A malformed reply fails the connection, this request with the others in flight.
    if (!req.error && req.type === Cmd.READ && req.chunked && req.length > 0 && !this.coversExactly(req)) {
      this.fail(`the server's reply to ${describe(req)} does not cover the range exactly once`);
      return;
    }
    if (!req.error && req.type === Cmd.BLOCK_STATUS && !req.status) {
      this.fail(`the server answered ${describe(req)} without a block status chunk for base:allocation`);
      return;
    }
    this.inflight.delete(req.cookie);
    this.inflightBytes -= req.cost;
    if (this.inflight.size === 0 && this.opts.requestTimeoutMs > 0) this.socket.setTimeout(0);
    if (req.error?.value === NbdErr.ESHUTDOWN && this.owner.onShutdown(this, req)) {
      rearm(req);
      this.owner.onProgress(this, false);
      return;
    }
    let err: IoError | undefined;
    if (!req.error && (req.type === Cmd.WRITE || req.type === Cmd.TRIM || req.type === Cmd.WRITE_ZEROES)) {
      this.owner.onAck(req);
    }
    if (req.error) {
      const code = errnoFromNbdError(req.error.value);
      err = new IoError(
        code,
        `${this.label}: ${describe(req)} failed on the server: ${nbdErrorName(req.error.value)}` +
          (req.error.message === '' ? '' : ` (${req.error.message})`),
      );
    }
    this.settle(req, err);
    this.owner.onProgress(this, true);
  }

  private coversExactly(req: Request): boolean {
    const f = req.filled ?? [];
    if (f.length === 2) return f[0] === 0 && f[1] === req.length;
    const ranges: [number, number][] = [];
    for (let i = 0; i + 1 < f.length; i += 2) ranges.push([f[i] ?? 0, f[i + 1] ?? 0]);
    ranges.sort((a, b) => a[0] - b[0]);
    let at = 0;
    for (const [start, end] of ranges) {
      if (start !== at) return false;
      at = end;
    }
    return at === req.length;
  }

  // -------------------------------------------------------------------------
  // Socket events and the reply parser

  /** Failed or closed: the parser ignores whatever still arrives. */
  private get dead(): boolean {
    return this.state === 'failed' || this.state === 'closed';
  }

  readBuffer(): Buffer {
    const req = this.current;
    if (this.parse === Parse.Data && this.dataLeft >= DIRECT_READ_MIN && req?.buf && !this.dead) {
      this.direct = req;
      return req.buf.subarray(this.dataAt, this.dataAt + this.dataLeft);
    }
    this.direct = undefined;
    return this.scratch;
  }

  received(n: number, buf: Buffer): void {
    const req = this.direct;
    this.direct = undefined;
    if (!req) {
      this.onData(buf.subarray(0, n));
      return;
    }
    // The bytes went straight into the request's buffer, where the parser expected them.
    if (this.dead) return;
    if (req !== this.current || this.parse !== Parse.Data) {
      this.fail('internal error: data was read for a request the parser is not reading');
      return;
    }
    this.dataAt += n;
    this.dataLeft -= n;
    if (this.dataLeft === 0) this.afterData(req);
  }

  private readonly onData = (chunk: Buffer): void => {
    let at = 0;
    while (at < chunk.length && !this.dead) {
      switch (this.parse) {
        case Parse.Header:
          at = this.parseHeader(chunk, at);
          break;
        case Parse.Data: {
          const req = this.current;
          if (!req?.buf) {
            this.fail('internal error: READ data without a buffer');
            return;
          }
          const n = Math.min(this.dataLeft, chunk.length - at);
          chunk.copy(req.buf, this.dataAt, at, at + n);
          at += n;
          this.dataAt += n;
          this.dataLeft -= n;
          if (this.dataLeft === 0) this.afterData(req);
          break;
        }
        case Parse.Payload: {
          const n = Math.min(this.payload.length - this.payloadHave, chunk.length - at);
          chunk.copy(this.payload, this.payloadHave, at, at + n);
          at += n;
          this.payloadHave += n;
          if (this.payloadHave === this.payload.length) this.afterPayload();
          break;
        }
      }
    }
  };

  private parseHeader(chunk: Buffer, at: number): number {
    if (this.headerHave === 0 && chunk.length - at >= 4) {
      const need = this.headerSize(chunk.readUInt32BE(at));
      if (need === 0) return chunk.length;
      if (chunk.length - at >= need) {
        this.onHeader(chunk, at);
        return at + need;
      }
    }
    // Slow path: the header straddles socket chunks. Its magic (the first 4 bytes) says how long it is.
    const want = this.headerHave < 4 ? 4 : this.headerSize(this.header.readUInt32BE(0));
    if (want === 0) return chunk.length;
    const n = Math.min(want - this.headerHave, chunk.length - at);
    chunk.copy(this.header, this.headerHave, at, at + n);
    this.headerHave += n;
    if (this.headerHave === want && want > 4) {
      this.headerHave = 0;
      this.onHeader(this.header, 0);
    }
    return at + n;
  }

  /** Header size for a reply magic; 0 (after failing the connection) for anything else. */
  private headerSize(magic: number): number {
    if (magic === SIMPLE_REPLY_MAGIC) return SIMPLE_REPLY_HEADER_SIZE;
    if (magic === STRUCTURED_REPLY_MAGIC) {
      if (this.info.structuredReplies) return STRUCTURED_REPLY_HEADER_SIZE;
      this.fail('the server sent a structured reply although structured replies were not negotiated');
      return 0;
    }
    this.fail(`the server sent a reply with bad magic 0x${magic.toString(16).padStart(8, '0')}`);
    return 0;
  }

  /**
   * The request a reply's cookie (8 bytes at `at`) names. Our cookies are
   * below 2^32, so the high half is zero and the low half is the key: read as
   * two numbers, no BigInt is made per reply.
   */
  private lookup(buf: Buffer, at: number, chunkType?: number): Request | undefined {
    const high = buf.readUInt32BE(at);
    const req = high === 0 ? this.inflight.get(buf.readUInt32BE(at + 4)) : undefined;
    if (!req) {
      const what = chunkType === undefined ? 'a reply' : `a chunk of type ${chunkType}`;
      this.fail(`the server sent ${what} for cookie ${buf.readBigUInt64BE(at)}, which no request in flight has`);
      return undefined;
    }
    return req;
  }

  private onHeader(buf: Buffer, at: number): void {
    if (buf.readUInt32BE(at) === SIMPLE_REPLY_MAGIC) {
      const req = this.lookup(buf, at + 8);
      if (!req) return;
      if (req.chunked) {
        this.fail(`the server sent a simple reply to ${describe(req)} in the middle of its structured reply`);
        return;
      }
      const error = buf.readUInt32BE(at + 4);
      if (error !== 0) {
        req.error = { value: error, message: '' };
        this.finish(req);
        return;
      }
      if (req.type === Cmd.BLOCK_STATUS) {
        this.fail(`the server answered ${describe(req)} with a simple reply, which cannot carry block status`);
        return;
      }
      if (req.type === Cmd.READ && req.length > 0) {
        this.current = req;
        this.dataAt = 0;
        this.dataLeft = req.length;
        this.parse = Parse.Data;
        return;
      }
      this.finish(req);
      return;
    }
    // Structured reply header: magic, flags (16), type (16), cookie, length (32).
    const flags = buf.readUInt16BE(at + 4);
    const type = buf.readUInt16BE(at + 6);
    const length = buf.readUInt32BE(at + 16);
    const req = this.lookup(buf, at + 8, type);
    if (!req) return;
    req.chunked = true;
    this.current = req;
    this.chunkFlags = flags;
    this.chunkType = type;
    switch (type) {
      case ReplyType.NONE:
        if (length !== 0) {
          this.badChunk(req, type, length, 'a NONE chunk carries no payload');
          return;
        }
        if ((flags & ReplyFlag.DONE) === 0) {
          this.badChunk(req, type, length, 'a NONE chunk must be the last');
          return;
        }
        this.endOfChunk(req);
        return;
      case ReplyType.OFFSET_DATA:
        if (req.type !== Cmd.READ) {
          this.badChunk(req, type, length, 'data for a request that is not a READ');
          return;
        }
        if (length <= 8 || length - 8 > req.length) {
          this.badChunk(req, type, length, `the most this READ allows is 8 + ${req.length}`);
          return;
        }
        this.chunkDataLength = length - 8;
        this.collect(8);
        return;
      case ReplyType.OFFSET_HOLE:
        if (req.type !== Cmd.READ) {
          this.badChunk(req, type, length, 'a hole for a request that is not a READ');
          return;
        }
        if (length !== 12) {
          this.badChunk(req, type, length, 'an OFFSET_HOLE chunk is 12 bytes');
          return;
        }
        this.collect(12);
        return;
      case ReplyType.BLOCK_STATUS:
        if (req.type !== Cmd.BLOCK_STATUS) {
          this.badChunk(req, type, length, 'block status for a request that is not BLOCK_STATUS');
          return;
        }
        if (length < 12 || (length - 4) % 8 !== 0 || length > MAX_STATUS_CHUNK) {
          this.badChunk(req, type, length, `block status is 4 + 8n bytes with 1 <= n <= ${MAX_STATUS_DESCRIPTORS}`);
          return;
        }
        this.collect(length);
        return;
      default:
        if (!isErrorChunk(type)) {
          this.badChunk(req, type, length, 'the type is unknown (the spec says to disconnect)');
          return;
        }
        if (length < 6 || length > MAX_ERROR_CHUNK) {
          this.badChunk(req, type, length, `an error chunk is 6 to ${MAX_ERROR_CHUNK} bytes`);
          return;
        }
        this.collect(length);
        return;
    }
  }

  private badChunk(req: Request, type: number, length: number, why: string): void {
    this.fail(`the server sent a chunk of type ${type} and ${length} bytes for ${describe(req)}: ${why}`);
  }

  private collect(n: number): void {
    this.payload = Buffer.allocUnsafe(n);
    this.payloadHave = 0;
    this.parse = Parse.Payload;
  }

  private afterPayload(): void {
    const req = this.current;
    if (!req) return;
    this.parse = Parse.Header;
    const payload = this.payload;
    this.payload = EMPTY;
    switch (this.chunkType) {
      case ReplyType.OFFSET_DATA: {
        const offset = payload.readUInt32BE(0) * 2 ** 32 + payload.readUInt32BE(4);
        const rel = offset - req.offset;
        if (rel < 0 || rel + this.chunkDataLength > req.length) {
          this.fail(
            `the server sent data at ${offset} length ${this.chunkDataLength} for ${describe(req)}, outside its range`,
          );
          return;
        }
        (req.filled ??= []).push(rel, rel + this.chunkDataLength);
        this.dataAt = rel;
        this.dataLeft = this.chunkDataLength;
        this.parse = Parse.Data;
        return;
      }
      case ReplyType.OFFSET_HOLE: {
        const hole = decodeOffsetHolePayload(payload);
        const rel = hole.offset - req.offset;
        if (hole.length === 0 || rel < 0 || rel + hole.length > req.length) {
          this.fail(
            `the server sent a hole at ${hole.offset} length ${hole.length} for ${describe(req)}, outside its range`,
          );
          return;
        }
        (req.filled ??= []).push(rel, rel + hole.length);
        req.buf?.fill(0, rel, rel + hole.length);
        break;
      }
      case ReplyType.BLOCK_STATUS: {
        const s = decodeBlockStatusPayload(payload);
        if (s.contextId !== this.info.baseAllocationId) {
          this.fail(`the server sent block status for context ${s.contextId}, which was never selected`);
          return;
        }
        if (req.status) {
          this.fail(`the server sent two block status chunks for base:allocation in one reply`);
          return;
        }
        let total = 0;
        for (const [i, e] of s.extents.entries()) {
          if (e.length === 0) {
            this.fail(`the server sent a zero-length extent for ${describe(req)}`);
            return;
          }
          // Only the last extent may reach past the request (proto.md, BLOCK_STATUS).
          if (i < s.extents.length - 1 && total + e.length > req.length) {
            this.fail(`the server's extents for ${describe(req)} run past its end before the last one`);
            return;
          }
          total += e.length;
        }
        req.status = s.extents;
        break;
      }
      default: {
        // An error chunk (ERROR, ERROR_OFFSET, or one this client does not know: the generic layout).
        let e;
        try {
          e = decodeErrorPayload(payload);
        } catch (err) {
          this.fail(`the server sent a malformed error chunk for ${describe(req)}: ${errorMessage(err)}`);
          return;
        }
        if (e.error === 0) {
          this.fail(`the server sent an error chunk with error 0 for ${describe(req)}`);
          return;
        }
        req.error ??= { value: e.error, message: e.message };
        break;
      }
    }
    this.endOfChunk(req);
  }

  private afterData(req: Request): void {
    this.parse = Parse.Header;
    // A simple reply's data ends the reply; an OFFSET_DATA chunk ends only its chunk.
    if (req.chunked) this.endOfChunk(req);
    else this.finish(req);
  }

  private endOfChunk(req: Request): void {
    this.parse = Parse.Header;
    if (this.chunkFlags & ReplyFlag.DONE) this.finish(req);
    else this.current = undefined;
  }

  private readonly onEnd = (): void => {
    this.lost('the server closed the connection');
  };

  private readonly onError = (err: Error): void => {
    this.lost(`the connection failed: ${err.message}`);
  };

  private readonly onTimeout = (): void => {
    if (this.inflight.size === 0) return;
    this.lost(`no reply from the server for ${this.opts.requestTimeoutMs} ms`);
  };

  /**
   * The connection is gone without the server breaking the protocol (EOF, a
   * reset, silence): with retry, its requests go back to the owner to be sent
   * again; without, they fail with EIO.
   */
  private lost(why: string): void {
    if (this.state === 'failed' || this.state === 'closed') return;
    if (this.discSent && this.inflight.size === 0) {
      this.socket.destroy();
      return;
    }
    const midReply = this.parse !== Parse.Header || this.headerHave > 0;
    const reason =
      this.inflight.size > 0 || midReply
        ? `${why}${midReply ? ' in the middle of a reply' : ''} with ${this.inflight.size} request(s) in flight`
        : why;
    if (!this.owner.retry) {
      this.fail(reason);
      return;
    }
    this.state = 'failed';
    this.failure = new IoError('EIO', `${this.label}: ${reason}`);
    this.current = undefined;
    this.direct = undefined;
    this.parse = Parse.Header;
    this.headerHave = 0;
    this.socket.destroy();
    const reqs: Request[] = [...this.inflight.values()];
    for (const req of this.queue.slice(this.queueHead)) if (req) reqs.push(req);
    this.inflight.clear();
    this.inflightBytes = 0;
    this.queue = [];
    this.queueHead = 0;
    for (const req of reqs) rearm(req);
    this.owner.onLost(this, reqs, reason);
  }

  private readonly onClose = (): void => {
    if (this.state !== 'failed') this.lost('the connection was closed');
    if (this.state !== 'failed') this.state = 'closed';
    if (this.closeTimer) clearTimeout(this.closeTimer);
    this.resolveClosed();
  };

  /** Graceful end or not, the socket is gone. */
  destroy(): void {
    this.socket.destroy();
  }

  get isDisconnecting(): boolean {
    return this.discSent;
  }
}

// ---------------------------------------------------------------------------
// The client: one or more connections to one export

/** An outage in progress: from the first lost connection until the client serves again (or gives up). */
interface Outage {
  /** performance.now() at its start. */
  since: number;
  why: string;
  /** The last reconnect attempt's failure, for the final message. */
  lastError: string | undefined;
  attempts: number;
  /** The next wait between attempts; it carries over into an outage that continues one (probation). */
  delayMs: number;
  /** A continued outage waits before its first attempt: the server just dropped us again. */
  waitFirst: boolean;
  readonly abort: AbortController;
  /** Fires at since + outageTimeoutMs; re-armed when the timeout is changed during the outage. */
  deadline: NodeJS.Timeout;
  loop: Promise<void> | undefined;
}

export class NbdClient {
  /** The URI (or transport) it was opened with, for messages. */
  readonly name: string;
  readonly info: NbdExportInfo;
  /** Minimum block size requests are aligned to (1 when the server sent none: it should accept any). */
  readonly alignment: number;
  /** Largest READ/WRITE payload sent, a multiple of the alignment. */
  readonly maxPayload: number;
  private readonly opts: Required<NbdClientOptions>;
  private readonly target: Target;
  /** Connections to keep (the first handshake decided: several only with CAN_MULTI_CONN). */
  private readonly wanted: number;
  private conns: Connection[] = [];
  private rr = 0;
  private closing: Promise<void> | undefined;
  private failure: IoError | undefined;

  /** Requests waiting for the outage to end (kept from lost connections, or new), oldest first. */
  private pending: Request[] = [];
  private outage: Outage | undefined;
  /**
   * Set when an outage ends, cleared by the first reply after it: a server
   * that drops every connection before answering anything (one that crashes
   * on a request, say) is one outage, not endless short ones, so the outage
   * timeout ends it.
   */
  private probation: { since: number; delayMs: number; until: number; countedMs: number } | undefined;
  private reconnectCount = 0;
  private outageTotalMs = 0;

  /** Acknowledged writes not yet covered by a FLUSH (only when the server has a volatile cache: SEND_FLUSH). */
  private readonly unflushed = new UnflushedLog();
  private readonly logWrites: boolean;
  /** Counts acknowledgements: a FLUSH covers those counted before it was sent. */
  private ackSeq = 0;
  /** A flush the client sent to bound the unflushed log, while it runs. */
  private autoFlush: Promise<void> | undefined;
  /** Writes waiting for autoFlush because the log is full. */
  private held: Request[] = [];

  private constructor(name: string, info: NbdExportInfo, opts: Required<NbdClientOptions>, target: Target) {
    this.name = name;
    this.info = info;
    this.opts = opts;
    this.target = target;
    this.alignment = info.advertisedBlockSize?.min ?? 1;
    const max = Math.min(info.advertisedBlockSize?.max ?? DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD);
    this.maxPayload = Math.max(this.alignment, max - (max % this.alignment));
    this.wanted = info.flags & TxFlag.CAN_MULTI_CONN ? Math.max(1, opts.connections) : 1;
    this.logWrites = opts.outageTimeoutMs > 0 && this.has(TxFlag.SEND_FLUSH) && !this.has(TxFlag.READ_ONLY);
  }

  /**
   * Connect to `target` (an NBD URI, or a parsed one) and complete the
   * handshake on every connection. Rejects with a message naming the server
   * and what went wrong. The URI's outage-timeout and request-timeout apply
   * unless `options` sets them.
   */
  static async connect(target: string | NbdUri, options: NbdClientOptions = {}): Promise<NbdClient> {
    const uri = typeof target === 'string' ? parseNbdUri(target) : target;
    const fromUri: NbdClientOptions = {};
    if (uri.timeouts.outageMs !== undefined) fromUri.outageTimeoutMs = uri.timeouts.outageMs;
    if (uri.timeouts.requestMs !== undefined) fromUri.requestTimeoutMs = uri.timeouts.requestMs;
    const opts = { ...DEFAULTS, ...fromUri, ...options };
    const name = uri.text;
    let tls: TlsConfig | undefined;
    if (uri.tls) {
      try {
        tls = resolveTls(uri);
      } catch (err) {
        if (err instanceof TlsConfigError) throw new Error(`${name}: ${err.message}`, { cause: err });
        throw err;
      }
    }
    const where = describeTransport(uri.transport);
    const dest: Target = { transport: uri.transport, exportName: uri.exportName, tls };
    const openOne = async (): Promise<Opened> => {
      try {
        return await open(dest, opts);
      } catch (err) {
        throw new Error(`${name}: cannot connect to ${where}: ${errorMessage(err)}`, { cause: err });
      }
    };
    const first = await openOne();
    const info = first.info;
    if (!Number.isSafeInteger(info.size)) {
      first.socket.destroy();
      throw new Error(`${name}: the export's size ${info.size} is beyond what this client handles`);
    }
    const client = new NbdClient(name, info, opts, dest);
    client.adopt(first);
    if (client.wanted > 1) {
      const more = await Promise.allSettled(Array.from({ length: client.wanted - 1 }, openOne));
      client.adoptExtras(more);
    }
    return client;
  }

  /** Adopt the extra connections that opened and negotiated what the first did. */
  private adoptExtras(more: PromiseSettledResult<Opened>[]): void {
    for (const r of more) {
      if (r.status === 'rejected') {
        log.warn(`${this.name}: an extra connection failed (${errorMessage(r.reason)}); going on with fewer`);
        continue;
      }
      if (sameExport(this.info, r.value.info) !== undefined) {
        log.warn(`${this.name}: an extra connection negotiated different export properties; not using it`);
        r.value.socket.destroy();
        continue;
      }
      this.adopt(r.value);
    }
  }

  private adopt(o: Opened): Connection {
    const owner: ConnectionOwner = {
      label: this.name,
      retry: this.opts.outageTimeoutMs > 0,
      onProgress: (conn, replied) => {
        if (replied) this.probation = undefined;
        conn.pump();
      },
      onFailure: (conn, err, unsent) => {
        this.onConnectionFailure(conn, err, unsent);
      },
      onLost: (conn, reqs, why) => {
        this.onLost(conn, reqs, why);
      },
      onShutdown: (conn, req) => this.onShutdown(conn, req),
      onAck: (req) => {
        this.onAck(req);
      },
    };
    const conn = new Connection(this.conns.length + 1, o, owner, this.opts);
    this.conns.push(conn);
    return conn;
  }

  /** The server broke the protocol: no reconnecting to it. */
  private onConnectionFailure(conn: Connection, err: IoError, unsent: Request[]): void {
    if (this.closing || this.failure) {
      for (const req of unsent) settleOnce(req, this.refusal() ?? err);
      return;
    }
    log.warn(err.message);
    if (this.opts.outageTimeoutMs > 0) {
      this.keep(unsent);
      // What was in flight on it failed (its replies cannot be trusted); the rest waits for a fresh
      // connection. A server that breaks the protocol every time ends as an outage past its timeout.
      this.startOutage(`the server broke the protocol (${err.message})`);
      return;
    }
    this.giveUp(new IoError('EIO', `${this.name}: the connection to the server was lost (${err.message})`), conn);
  }

  /**
   * Fail for good with `err`: everything waiting fails, the other
   * connections finish what they have in flight and take nothing more, and
   * nothing reconnects.
   */
  private giveUp(err: IoError, except?: Connection): void {
    this.failure ??= err;
    const o = this.outage;
    if (o) {
      this.outage = undefined;
      clearTimeout(o.deadline);
      o.abort.abort();
      this.outageTotalMs += performance.now() - o.since;
    }
    const waiting = [...this.pending, ...this.held];
    this.pending = [];
    this.held = [];
    for (const req of waiting) settleOnce(req, this.failure);
    for (const c of this.conns) {
      if (c === except) continue;
      for (const req of c.takeQueued()) settleOnce(req, this.failure);
      c.drain();
    }
  }

  // -------------------------------------------------------------------------
  // Outages: lost connections, reconnecting, replaying

  private onLost(_conn: Connection, reqs: Request[], why: string): void {
    this.keep(reqs);
    this.startOutage(why);
  }

  /** Keep `reqs` for after the outage, or fail them if there will be no after. */
  private keep(reqs: Request[]): void {
    const refused = this.refusal() ?? (this.opts.outageTimeoutMs > 0 ? undefined : this.failure);
    for (const req of reqs) {
      if (refused) settleOnce(req, refused);
      // The client's own requests are made again from the log when it is needed.
      else if (req.internal) settleOnce(req, new ConnectionLost('the connection was lost'));
      else this.pending.push(req);
    }
  }

  private onShutdown(conn: Connection, req: Request): boolean {
    if (this.opts.outageTimeoutMs <= 0) {
      log.info(`${this.name}: the server is shutting down; closing connection ${conn.id}`);
      conn.rejectQueued(new IoError('ESHUTDOWN', `${this.name}: the server is shutting down`));
      conn.drain();
      if (this.live().length === 0) {
        this.failure ??= new IoError('ESHUTDOWN', `${this.name}: the server is shutting down`);
      }
      return false;
    }
    if (this.closing || this.failure) return false;
    // A server going down (for a restart, perhaps): like a lost connection, but it says so first.
    this.keep([req]);
    this.startOutage('the server is shutting down (ESHUTDOWN)');
    return true;
  }

  /**
   * Begin an outage (once): open connections take nothing new and finish
   * what they have; what they had queued waits with the rest.
   */
  private startOutage(why: string): void {
    if (this.failure || this.closing) return;
    if (!this.outage) {
      const abort = new AbortController();
      const timeout = this.opts.outageTimeoutMs;
      const now = performance.now();
      const continued = this.probation && now < this.probation.until ? this.probation : undefined;
      const since = continued?.since ?? now;
      this.probation = undefined;
      const o: Outage = {
        since,
        why,
        lastError: undefined,
        attempts: 0,
        delayMs: continued?.delayMs ?? RECONNECT_FIRST_MS,
        waitFirst: continued !== undefined,
        abort,
        deadline: setTimeout(
          () => {
            this.outageExpired(o);
          },
          Math.max(0, since + timeout - now),
        ),
        loop: undefined,
      };
      this.outage = o;
      // The outage this one continues was counted when it ended; it is counted again, whole, when this one ends.
      this.outageTotalMs -= continued?.countedMs ?? 0;
      log.warn(
        since === now
          ? `${this.name}: ${why}; reconnecting (for up to ${timeout / 1000} s)`
          : `${this.name}: ${why} before answering anything since the last reconnect; ` +
              `reconnecting, within the outage that began ${Math.round(now - since)} ms ago`,
      );
      o.loop = this.reconnect(o);
    }
    for (const c of this.conns) {
      if (c.state !== 'open') continue;
      this.keep(c.takeQueued());
      c.drain();
    }
  }

  private outageExpired(o: Outage): void {
    if (this.outage !== o) return;
    const s = Math.round(this.opts.outageTimeoutMs / 100) / 10;
    const err = new IoError(
      'EIO',
      `${this.name}: the server has been unreachable for ${s} s (outage timeout), giving up: ${o.lastError ?? o.why}`,
    );
    log.error(err.message);
    this.giveUp(err);
  }

  /** Reconnect, replay and resume, retrying with backoff until it works, fails for good or the outage is over. */
  private async reconnect(o: Outage): Promise<void> {
    const signal = o.abort.signal;
    for (;;) {
      // The old connections finish first: a write still in flight on one must not land after a replayed older one.
      await untilAborted(Promise.all(this.conns.map((c) => c.closed)), signal);
      if (aborted(signal)) return;
      this.conns = [];
      if (o.attempts > 0 || o.waitFirst) {
        // Jitter: many clients of one restarted server do not come back in lockstep.
        if (!(await sleep(o.delayMs / 2 + (Math.random() * o.delayMs) / 2, signal))) return;
        o.delayMs = Math.min(o.delayMs * 2, RECONNECT_MAX_MS);
      }
      o.attempts++;
      try {
        await this.reopen(signal);
        if (aborted(signal)) {
          // Closed or given up while connecting: what reopen() adopted must not stay open.
          for (const c of this.conns) c.drain();
          return;
        }
        // The replay can break the new connections again (a lost or misbehaving server): try again.
        if (this.live().length === 0) throw new ConnectionLost('the new connection was lost before it served');
        this.resume(o);
        return;
      } catch (err) {
        if (aborted(signal) || this.outage !== o) return;
        const fatal =
          (err instanceof NbdHandshakeError && (err.kind === 'violation' || err.kind === 'tls')) ||
          err instanceof ExportChanged ||
          err instanceof IoError;
        if (fatal) {
          const e = new IoError('EIO', `${this.name}: cannot reconnect: ${errorMessage(err)}`, { cause: err });
          log.error(e.message);
          this.giveUp(e);
          return;
        }
        o.lastError = errorMessage(err);
        log.debug(`${this.name}: reconnect attempt ${o.attempts} failed: ${o.lastError}`);
        for (const c of this.conns) c.destroy();
      }
    }
  }

  /** Open the connections again, check the export is the same one, and write back the unflushed writes. */
  private async reopen(signal: AbortSignal): Promise<void> {
    const first = await open(this.target, this.opts, signal);
    const changed = sameExport(this.info, first.info);
    if (changed !== undefined) {
      first.socket.destroy();
      throw new ExportChanged(`the export is not the one it was: ${changed}`);
    }
    if (signal.aborted) {
      first.socket.destroy();
      return;
    }
    this.adopt(first);
    if (this.wanted > 1) {
      const more = await Promise.allSettled(
        Array.from({ length: this.wanted - 1 }, () => open(this.target, this.opts, signal)),
      );
      if (aborted(signal)) {
        for (const r of more) if (r.status === 'fulfilled') r.value.socket.destroy();
        return;
      }
      this.adoptExtras(more);
    }
    const extents = this.unflushed.snapshot();
    if (extents.length === 0) return;
    log.info(
      `${this.name}: writing again ${extents.length} acknowledged but unflushed range(s) ` +
        `(${this.unflushed.bytes} bytes of data) the server may have lost`,
    );
    const sent: Promise<void>[] = [];
    for (const e of extents) {
      const length = e.end - e.start;
      const type = e.kind === 'data' ? Cmd.WRITE : e.kind === 'zero' ? Cmd.WRITE_ZEROES : Cmd.TRIM;
      const flags = e.kind === 'zero' && e.noHole ? CmdFlag.NO_HOLE : 0;
      const piece = type === Cmd.WRITE ? this.maxPayload : NO_PAYLOAD_PIECE;
      for (let at = 0; at < length; at += piece) {
        const n = Math.min(piece, length - at);
        const { req, done } = newRequest(type, flags, e.start + at, n, e.data?.subarray(at, at + n));
        req.internal = true;
        this.place(req);
        sent.push(done);
      }
    }
    const results = await Promise.allSettled(sent);
    for (const r of results) {
      if (r.status !== 'rejected') continue;
      // Lost again: retried with the reconnect. The server refusing them: they cannot be restored (fatal).
      if (r.reason instanceof ConnectionLost) throw r.reason;
      throw new IoError('EIO', `acknowledged writes could not be written again: ${errorMessage(r.reason)}`);
    }
  }

  /** Connected and restored: the outage is over, the requests kept are sent. */
  private resume(o: Outage): void {
    clearTimeout(o.deadline);
    const ms = performance.now() - o.since;
    this.outageTotalMs += ms;
    this.outage = undefined;
    this.reconnectCount++;
    this.probation = { since: o.since, delayMs: o.delayMs, until: performance.now() + PROBATION_MS, countedMs: ms };
    const kept = this.pending;
    this.pending = [];
    log.warn(
      `${this.name}: reconnected after ${Math.round(ms)} ms (${o.attempts} attempt(s), ` +
        `${this.live().length} connection(s)); sending ${kept.length} waiting request(s) again`,
    );
    for (const req of kept) this.place(req);
  }

  // -------------------------------------------------------------------------
  // The unflushed log

  private onAck(req: Request): void {
    if (!this.logWrites || req.internal) return;
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    if (fua) {
      // Durable already, and newer than whatever older write of the range the log holds.
      this.unflushed.clear(req.offset, req.length);
      return;
    }
    const seq = ++this.ackSeq;
    if (req.type === Cmd.WRITE && req.buf) this.unflushed.putData(req.offset, req.buf, seq);
    else if (req.type === Cmd.WRITE_ZEROES) {
      this.unflushed.putZero(req.offset, req.length, (req.flags & CmdFlag.NO_HOLE) !== 0, seq);
    } else if (req.type === Cmd.TRIM) this.unflushed.putTrim(req.offset, req.length, seq);
    if (
      this.unflushed.bytes > Math.min(this.opts.autoFlushBytes, this.opts.maxUnflushedBytes / 2) ||
      this.unflushed.size > Math.min(this.opts.autoFlushEntries, this.opts.maxUnflushedEntries / 2)
    ) {
      this.startAutoFlush();
    }
  }

  /** The unflushed log is at a bound: new writes, zeroes and trims wait for the client's own flush. */
  private logFull(req: Request): boolean {
    if (!this.logWrites || req.internal) return false;
    if (req.type !== Cmd.WRITE && req.type !== Cmd.WRITE_ZEROES && req.type !== Cmd.TRIM) return false;
    return this.unflushed.bytes >= this.opts.maxUnflushedBytes || this.unflushed.size >= this.opts.maxUnflushedEntries;
  }

  /** A FLUSH of the client's own, so that the log can drop what it covers. */
  private startAutoFlush(): void {
    if (this.autoFlush || this.closing || this.failure) return;
    this.autoFlush = this.flush()
      .catch((err: unknown) => {
        log.warn(`${this.name}: a flush to bound the unflushed writes failed: ${errorMessage(err)}`);
      })
      .finally(() => {
        this.autoFlush = undefined;
        const held = this.held;
        this.held = [];
        for (const req of held) this.dispatch(req);
      });
  }

  // -------------------------------------------------------------------------
  // State

  private live(): Connection[] {
    return this.conns.filter((c) => c.state === 'open');
  }

  /** Connections in use (after failures, those still open; none during an outage). */
  get connections(): number {
    return this.outage ? 0 : this.live().length;
  }

  /** Requests sent per connection, by command name (for tests and diagnostics). */
  get requestCounts(): Record<string, number>[] {
    return this.conns.map((c) => ({ ...c.sent }));
  }

  /** Set once the client can serve no more requests (protocol violation, outage past its timeout, server shut down). */
  get failed(): IoError | undefined {
    return this.failure;
  }

  /** How long an outage may last before the client gives up, in ms (0: it never reconnects). */
  get outageTimeoutMs(): number {
    return this.opts.outageTimeoutMs;
  }

  /**
   * Change the outage timeout at run time (sysfs). An outage in progress gets
   * the new deadline, counted from its start. 0 (never reconnect) is only for
   * opening: a client that keeps no replay log cannot start riding out outages.
   */
  set outageTimeoutMs(ms: number) {
    if (!Number.isSafeInteger(ms) || ms <= 0)
      throw new RangeError(`outage timeout ${ms} ms: expected a whole number above 0`);
    if (this.opts.outageTimeoutMs <= 0) {
      throw new RangeError('this client was opened with outage-timeout=0 and does not reconnect');
    }
    this.opts.outageTimeoutMs = ms;
    const o = this.outage;
    if (o) {
      clearTimeout(o.deadline);
      o.deadline = setTimeout(
        () => {
          this.outageExpired(o);
        },
        Math.max(0, o.since + ms - performance.now()),
      );
    }
  }

  /** Outages survived: reconnects that brought the client back. */
  get reconnects(): number {
    return this.reconnectCount;
  }

  /** Time spent in outages so far, the current one included, in ms. */
  get outageMs(): number {
    return this.outageTotalMs + (this.outage ? performance.now() - this.outage.since : 0);
  }

  /** Serving now: not in an outage, not failed, not closed. */
  get online(): boolean {
    return !this.outage && !this.failure && !this.closing;
  }

  /** Acknowledged writes kept for replay, in bytes of data. */
  get unflushedBytes(): number {
    return this.unflushed.bytes;
  }

  /** Entries of the unflushed log (writes, zeroes and trims not yet covered by a FLUSH). */
  get unflushedEntries(): number {
    return this.unflushed.size;
  }

  get size(): number {
    return this.info.size;
  }

  get flags(): number {
    return this.info.flags;
  }

  private has(flag: number): boolean {
    return (this.info.flags & TxFlag.HAS_FLAGS) !== 0 && (this.info.flags & flag) !== 0;
  }

  /** Queue a request on the least loaded connection. */
  private submit(type: number, flags: number, offset: number, length: number, buf?: Buffer): Promise<void> {
    const { req, done } = newRequest(type, flags, offset, length, buf);
    this.dispatch(req);
    return done;
  }

  /** Take a new request: to a connection, or to wait for the outage or a flush to end; or fail it. */
  private dispatch(req: Request): void {
    const refused = this.refusal();
    if (refused) {
      settleOnce(req, refused);
      return;
    }
    const waiting = this.pending.length + this.held.length;
    if (this.outage) {
      if (waiting >= this.opts.maxQueued) {
        settleOnce(req, new IoError('ENOMEM', `${this.name}: ${waiting} requests are already waiting for the server`));
      } else {
        this.pending.push(req);
      }
      return;
    }
    if (this.logFull(req)) {
      if (waiting >= this.opts.maxQueued) {
        settleOnce(req, new IoError('ENOMEM', `${this.name}: ${waiting} requests are already waiting to be sent`));
        return;
      }
      this.held.push(req);
      this.startAutoFlush();
      return;
    }
    let total = 0;
    for (const c of this.conns) total += c.queued;
    if (total >= this.opts.maxQueued) {
      settleOnce(req, new IoError('ENOMEM', `${this.name}: ${total} requests are already waiting to be sent`));
      return;
    }
    this.place(req);
  }

  /**
   * Hand `req` to the first open connection with room for it (fewer than
   * spillAt requests, able to send it now), else to the least loaded open one
   * (round robin among equals); or fail it. Filling one connection before the
   * next keeps a light load on one server-side pool (see the header).
   */
  private place(req: Request): void {
    for (const c of this.conns) {
      if (c.hasRoom(req, this.opts.spillAt)) {
        c.submit(req);
        return;
      }
    }
    let best: Connection | undefined;
    const n = this.conns.length;
    for (let i = 0; i < n; i++) {
      const c = this.conns[(this.rr + i) % n];
      if (!c || c.state !== 'open') continue;
      if (!best || c.load < best.load) best = c;
    }
    if (!best) {
      if (req.internal) settleOnce(req, new ConnectionLost('no connection is open'));
      else settleOnce(req, new IoError('EIO', `${this.name}: no connection is open`));
      return;
    }
    this.rr = (this.rr + 1) % n;
    best.submit(req);
  }

  private refusal(): IoError | undefined {
    if (this.closing) return new IoError('ESHUTDOWN', `${this.name}: the client is closed`);
    return this.failure;
  }

  private checkRange(offset: number, length: number, write: boolean): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new IoError('EINVAL', `${this.name}: invalid range offset=${offset} length=${length}`);
    }
    if (offset + length > this.info.size) {
      throw new IoError(
        write ? 'ENOSPC' : 'EINVAL',
        `${this.name}: range ${offset}+${length} extends past the end of the export (${this.info.size} bytes)`,
      );
    }
  }

  private checkAligned(what: string, offset: number, length: number): void {
    const a = this.alignment;
    if (a > 1 && (offset % a !== 0 || length % a !== 0)) {
      throw new IoError(
        'EINVAL',
        `${this.name}: ${what} at ${offset} length ${length} is not aligned to the server's minimum block size ${a}`,
      );
    }
  }

  private need(flag: number, what: string): void {
    if (!this.has(flag)) throw new IoError('EINVAL', `${this.name}: the server does not support ${what}`);
  }

  private writable(): void {
    if (this.has(TxFlag.READ_ONLY)) throw new IoError('EPERM', `${this.name}: the export is read-only`);
  }

  /**
   * Run `one` over [offset, offset+length) in pieces of at most `piece`
   * bytes, all at once. Waits for every piece before failing, so no piece
   * is still using the caller's buffer when the promise settles.
   */
  private async pieces(
    offset: number,
    length: number,
    piece: number,
    one: (at: number, n: number) => Promise<void>,
  ): Promise<void> {
    if (length <= piece) return one(offset, length);
    const all: Promise<void>[] = [];
    for (let at = offset; at < offset + length; at += piece) all.push(one(at, Math.min(piece, offset + length - at)));
    const results = await Promise.allSettled(all);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /** Fill `buf` from `offset`. Unaligned reads are widened to the server's minimum block size. */
  read(buf: Buffer, offset: number): Promise<void> {
    try {
      this.checkRange(offset, buf.length, false);
    } catch (err) {
      return rejectWith(err);
    }
    if (buf.length === 0) return Promise.resolve();
    const a = this.alignment;
    if (a > 1 && (offset % a !== 0 || buf.length % a !== 0)) return this.readWidened(buf, offset, a);
    // One request, the common case, without the closure and the extra promise of pieces().
    if (buf.length <= this.maxPayload) return this.submit(Cmd.READ, 0, offset, buf.length, buf);
    return this.pieces(offset, buf.length, this.maxPayload, (at, n) =>
      this.submit(Cmd.READ, 0, at, n, buf.subarray(at - offset, at - offset + n)),
    );
  }

  private async readWidened(buf: Buffer, offset: number, a: number): Promise<void> {
    const start = offset - (offset % a);
    const end = Math.min(Math.ceil((offset + buf.length) / a) * a, this.info.size);
    const wide = Buffer.allocUnsafe(end - start);
    await this.read(wide, start);
    wide.copy(buf, 0, offset - start, offset - start + buf.length);
  }

  /** Write all of `buf` at `offset`; with `fua` (only if the server offers SEND_FUA) durable on return. */
  write(buf: Buffer, offset: number, options: { fua?: boolean } = {}): Promise<void> {
    try {
      this.writable();
      this.checkRange(offset, buf.length, true);
      this.checkAligned('WRITE', offset, buf.length);
      if (options.fua === true) this.need(TxFlag.SEND_FUA, 'FUA');
    } catch (err) {
      return rejectWith(err);
    }
    if (buf.length === 0) return Promise.resolve();
    const flags = options.fua === true ? CmdFlag.FUA : 0;
    if (buf.length <= this.maxPayload) return this.submit(Cmd.WRITE, flags, offset, buf.length, buf);
    return this.pieces(offset, buf.length, this.maxPayload, (at, n) =>
      this.submit(Cmd.WRITE, flags, at, n, buf.subarray(at - offset, at - offset + n)),
    );
  }

  /**
   * NBD_CMD_FLUSH on every connection: writes completed before the call are
   * durable when it resolves. With CAN_MULTI_CONN one would do (proto.md); every
   * one is asked so a server with per-connection caches is covered too. During
   * an outage one FLUSH waits with the other requests, and goes after the
   * replayed writes.
   */
  async flush(): Promise<void> {
    this.need(TxFlag.SEND_FLUSH, 'FLUSH');
    const refused = this.refusal();
    if (refused) throw refused;
    // What this flush makes durable: every write acknowledged so far (and replayed, if need be).
    const mark = this.ackSeq;
    const live = this.outage ? [] : this.live();
    const all: Promise<void>[] = [];
    if (live.length === 0) {
      const { req, done } = newRequest(Cmd.FLUSH, 0, 0, 0, undefined);
      this.dispatch(req);
      all.push(done);
    }
    for (const c of live) {
      const { req, done } = newRequest(Cmd.FLUSH, 0, 0, 0, undefined);
      c.submit(req);
      all.push(done);
    }
    const results = await Promise.allSettled(all);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
    this.unflushed.dropUpTo(mark);
  }

  /** NBD_CMD_TRIM over an aligned range (the server may ignore it). */
  async trim(offset: number, length: number, options: { fua?: boolean } = {}): Promise<void> {
    this.writable();
    this.need(TxFlag.SEND_TRIM, 'TRIM');
    this.checkRange(offset, length, true);
    this.checkAligned('TRIM', offset, length);
    if (options.fua === true) this.need(TxFlag.SEND_FUA, 'FUA');
    if (length === 0) return;
    const flags = options.fua === true ? CmdFlag.FUA : 0;
    await this.pieces(offset, length, NO_PAYLOAD_PIECE, (at, n) => this.submit(Cmd.TRIM, flags, at, n));
  }

  /** NBD_CMD_WRITE_ZEROES; `fastZero` fails with ENOTSUP unless the server can zero faster than writing. */
  async writeZeroes(
    offset: number,
    length: number,
    options: { noHole?: boolean; fastZero?: boolean; fua?: boolean } = {},
  ): Promise<void> {
    this.writable();
    this.need(TxFlag.SEND_WRITE_ZEROES, 'WRITE_ZEROES');
    this.checkRange(offset, length, true);
    this.checkAligned('WRITE_ZEROES', offset, length);
    if (options.fastZero === true) this.need(TxFlag.SEND_FAST_ZERO, 'FAST_ZERO');
    if (options.fua === true) this.need(TxFlag.SEND_FUA, 'FUA');
    if (length === 0) return;
    const flags =
      (options.noHole === true ? CmdFlag.NO_HOLE : 0) |
      (options.fastZero === true ? CmdFlag.FAST_ZERO : 0) |
      (options.fua === true ? CmdFlag.FUA : 0);
    await this.pieces(offset, length, NO_PAYLOAD_PIECE, (at, n) => this.submit(Cmd.WRITE_ZEROES, flags, at, n));
  }

  /** base:allocation over [offset, offset+length), covering it exactly, adjacent runs merged. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.checkRange(offset, length, false);
    if (this.info.baseAllocationId === undefined) {
      throw new IoError('EINVAL', `${this.name}: the server did not select base:allocation`);
    }
    const out: Extent[] = [];
    const end = offset + length;
    const a = this.alignment;
    let pos = offset;
    while (pos < end) {
      const start = pos - (pos % a);
      const stop = Math.min(Math.ceil(Math.min(end, start + NO_PAYLOAD_PIECE) / a) * a, this.info.size);
      const { req, done } = newRequest(Cmd.BLOCK_STATUS, 0, start, stop - start, undefined);
      this.dispatch(req);
      await done;
      let at = start;
      for (const d of req.status ?? []) {
        const from = Math.max(at, pos);
        const to = Math.min(at + d.length, end);
        at += d.length;
        if (to <= from) continue;
        const hole = (d.flags & State.HOLE) !== 0;
        const zero = (d.flags & State.ZERO) !== 0;
        const last = out[out.length - 1];
        if (last && last.hole === hole && last.zero === zero) last.length += to - from;
        else out.push({ length: to - from, hole, zero });
      }
      // Each reply describes at least one non-empty extent, so this always moves forward.
      pos = Math.max(pos, Math.min(at, end));
    }
    return out;
  }

  /**
   * Finish every request already accepted, send NBD_CMD_DISC on every
   * connection and wait for the sockets to close. Later calls fail with
   * ESHUTDOWN. Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const o = this.outage;
      if (o) {
        // Nothing to finish requests on: those waiting for the server fail, and reconnecting stops.
        this.outage = undefined;
        clearTimeout(o.deadline);
        o.abort.abort();
        this.outageTotalMs += performance.now() - o.since;
        const err = new IoError('ESHUTDOWN', `${this.name}: the client was closed while the server was unreachable`);
        for (const req of this.pending.splice(0)) settleOnce(req, err);
      }
      // Writes held for a flush were accepted: they go now.
      for (const req of this.held.splice(0)) this.place(req);
      for (const c of this.conns) c.drain();
      await o?.loop;
      // A reconnect cut short may have adopted connections after the drain above.
      for (const c of this.conns) c.drain();
      await Promise.all(this.conns.map((c) => c.closed));
    })();
    return this.closing;
  }
}

/** Is the BLOCK_STATUS / TRIM piece size a multiple of every legal minimum block size? (Checked once, here.) */
if (NO_PAYLOAD_PIECE % 65536 !== 0) throw new Error('NO_PAYLOAD_PIECE must be a multiple of 64 KiB');
