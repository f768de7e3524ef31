// The fixed-newstyle handshake: greeting, client flags, then option haggling
// until the client picks an export (GO or EXPORT_NAME), aborts, or leaves.
// Every option we do not implement gets NBD_REP_ERR_UNSUP and haggling goes
// on; malformed option data gets NBD_REP_ERR_INVALID. Only violations of the
// framing itself (bad magic, unknown client flags) end the connection.

import type { Socket } from 'node:net';
import { log } from '../util/log.ts';
import {
  CodecError,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
} from './codec.ts';
import type { Export } from './exports.ts';
import {
  BASE_ALLOCATION,
  ClientFlag,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  MAX_STRING_BYTES,
  OPTION_HEADER_SIZE,
  Opt,
  Rep,
  optionName,
} from './protocol.ts';
import type { SocketReader } from './reader.ts';

/** The context id we hand out for base:allocation (any value is legal; 0 is reserved for LIST replies). */
export const BASE_ALLOCATION_ID = 1;

/** Option data we read into memory; larger options are skipped and answered with NBD_REP_ERR_TOO_BIG. */
export const MAX_OPTION_DATA = 64 * 1024;
/** Option data so large that reading it off the socket is itself abuse: disconnect. */
export const MAX_SKIPPED_OPTION_DATA = 16 * 1024 * 1024;

/** The peer broke a MUST of the protocol framing; the connection is dropped. */
export class ProtocolViolation extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolViolation';
  }
}

export interface HandshakeContext {
  /** "" names the default export. */
  findExport(name: string): Export | undefined;
  exports(): readonly Export[];
  isShuttingDown(): boolean;
  /** Told true while the handshake waits for the next option with nothing buffered: shutdown may then hang up at once. */
  setIdle(idle: boolean): void;
  /** Prefix for log lines, e.g. "connection 3". */
  readonly label: string;
  /** TLS, when the server offers it (server-tls.ts). */
  readonly tls?: {
    /** Options other than STARTTLS and ABORT are refused (NBD_REP_ERR_TLS_REQD) until the client upgrades. */
    readonly required: boolean;
    /** Run the TLS handshake on the connection; haggling continues on what it returns. */
    upgrade(): Promise<{ socket: Socket; reader: SocketReader }>;
  };
}

export interface Negotiated {
  export: Export;
  structuredReplies: boolean;
  /** The base:allocation context id if the client selected it for this export. */
  baseAllocationId: number | undefined;
}

interface MetaSelection {
  export: Export;
  id: number;
}

function exportList(ctx: HandshakeContext): string {
  return ctx
    .exports()
    .map((e) => `'${e.name}'`)
    .join(', ');
}

/**
 * Run the handshake on a fresh connection. Resolves with what was negotiated
 * when the client enters transmission, or undefined when it ended haggling
 * (NBD_OPT_ABORT, or an EXPORT_NAME we had to refuse). Rejects with
 * ProtocolViolation or ConnectionClosed.
 */
export async function negotiate(
  plainSocket: Socket,
  plainReader: SocketReader,
  ctx: HandshakeContext,
): Promise<Negotiated | undefined> {
  // After NBD_OPT_STARTTLS both are the TLS socket's.
  let socket = plainSocket;
  let reader = plainReader;
  let secure = false;
  const send = (buf: Buffer): void => {
    if (!socket.destroyed) socket.write(buf);
  };
  send(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));

  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  const known = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES;
  if ((clientFlags & ~known) !== 0) {
    throw new ProtocolViolation(`client sent unknown client flags 0x${clientFlags.toString(16)}`);
  }
  // Clients that do not echo C_FIXED_NEWSTYLE only ever send EXPORT_NAME, which works the same either way.
  const noZeroes = (clientFlags & ClientFlag.C_NO_ZEROES) !== 0;

  let structuredReplies = false;
  let meta: MetaSelection | undefined;

  for (;;) {
    // Between options, a server that is shutting down has nothing left to say.
    if (ctx.isShuttingDown() && reader.bufferedBytes === 0) return undefined;
    ctx.setIdle(true);
    const headerBytes = await reader.read(OPTION_HEADER_SIZE);
    ctx.setIdle(false);
    const header = decodeOptionHeader(headerBytes);
    if (header.magic !== IHAVEOPT) {
      throw new ProtocolViolation(`bad option magic 0x${header.magic.toString(16)} (expected IHAVEOPT)`);
    }
    const { option, length } = header;
    const name = optionName(option);
    log.debug(`${ctx.label}: ${name} with ${length} bytes of data`);
    const reply = (type: number, data?: Buffer): void => {
      send(encodeOptionReply(option, type, data));
    };
    const error = (type: number, message: string): void => {
      log.debug(`${ctx.label}: ${name} refused: ${message}`);
      send(encodeOptionError(option, type, message));
    };

    if (length > MAX_OPTION_DATA) {
      if (option === Opt.EXPORT_NAME || length > MAX_SKIPPED_OPTION_DATA) {
        throw new ProtocolViolation(`${name} with ${length} bytes of data is far larger than any valid option`);
      }
      await reader.skip(length);
      error(Rep.ERR_TOO_BIG, `${name} with ${length} bytes of data is larger than the ${MAX_OPTION_DATA}-byte limit`);
      continue;
    }
    const data = await reader.read(length);

    if (ctx.tls?.required === true && !secure && option !== Opt.STARTTLS && option !== Opt.ABORT) {
      if (option === Opt.EXPORT_NAME) {
        // EXPORT_NAME cannot carry an error: the spec's answer is to hang up.
        log.warn(`${ctx.label}: NBD_OPT_EXPORT_NAME in clear, but this server requires TLS; disconnecting`);
        return undefined;
      }
      error(Rep.ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first (an nbds:// URI)');
      continue;
    }

    if (ctx.isShuttingDown()) {
      if (option === Opt.ABORT) {
        reply(Rep.ACK);
        return undefined;
      }
      if (option === Opt.EXPORT_NAME) {
        log.debug(`${ctx.label}: NBD_OPT_EXPORT_NAME while shutting down; disconnecting`);
        return undefined;
      }
      error(Rep.ERR_SHUTDOWN, 'the server is shutting down; try again once it is back');
      continue;
    }

    switch (option) {
      case Opt.EXPORT_NAME: {
        if (data.length > MAX_STRING_BYTES) {
          throw new ProtocolViolation(`NBD_OPT_EXPORT_NAME with a ${data.length}-byte name`);
        }
        const wanted = data.toString('utf8');
        const exp = ctx.findExport(wanted);
        if (!exp) {
          // EXPORT_NAME cannot carry an error: the spec's answer is to hang up.
          log.warn(`${ctx.label}: client asked for unknown export '${wanted}' (exports: ${exportList(ctx)})`);
          return undefined;
        }
        send(encodeExportNameReply(exp.size, exp.flags, noZeroes));
        return { export: exp, structuredReplies, baseAllocationId: meta?.export === exp ? meta.id : undefined };
      }

      case Opt.ABORT:
        // Data is to be ignored, not rejected (proto.md, NBD_OPT_ABORT).
        reply(Rep.ACK);
        return undefined;

      case Opt.LIST:
        if (data.length !== 0) {
          error(Rep.ERR_INVALID, `NBD_OPT_LIST takes no data but ${data.length} bytes were sent`);
          break;
        }
        for (const e of ctx.exports()) reply(Rep.SERVER, encodeRepServer(e.name, e.description));
        reply(Rep.ACK);
        break;

      case Opt.INFO:
      case Opt.GO: {
        let req;
        try {
          req = decodeInfoRequest(data);
        } catch (err) {
          if (!(err instanceof CodecError)) throw err;
          error(Rep.ERR_INVALID, err.message);
          break;
        }
        const exp = ctx.findExport(req.name);
        if (!exp) {
          error(Rep.ERR_UNKNOWN, `there is no export named '${req.name}'; exports: ${exportList(ctx)}`);
          break;
        }
        reply(Rep.INFO, encodeInfoExport(exp.size, exp.flags));
        if (req.requests.includes(Info.NAME)) reply(Rep.INFO, encodeInfoString(Info.NAME, exp.name));
        if (req.requests.includes(Info.DESCRIPTION) && exp.description !== '') {
          reply(Rep.INFO, encodeInfoString(Info.DESCRIPTION, exp.description));
        }
        // Sent unasked too: clients ignore info they did not request, and it documents our limits.
        reply(Rep.INFO, encodeInfoBlockSize(exp.blockSize));
        reply(Rep.ACK);
        if (option === Opt.GO) {
          return { export: exp, structuredReplies, baseAllocationId: meta?.export === exp ? meta.id : undefined };
        }
        break;
      }

      case Opt.STRUCTURED_REPLY:
        if (data.length !== 0) {
          error(Rep.ERR_INVALID, `NBD_OPT_STRUCTURED_REPLY takes no data but ${data.length} bytes were sent`);
          break;
        }
        structuredReplies = true;
        reply(Rep.ACK);
        break;

      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT: {
        const set = option === Opt.SET_META_CONTEXT;
        // SET replaces the selection even when it fails.
        if (set) meta = undefined;
        if (!structuredReplies) {
          error(Rep.ERR_INVALID, `${name} needs structured replies: send NBD_OPT_STRUCTURED_REPLY first`);
          break;
        }
        let req;
        try {
          req = decodeMetaContextRequest(data);
        } catch (err) {
          if (!(err instanceof CodecError)) throw err;
          error(Rep.ERR_INVALID, err.message);
          break;
        }
        const exp = ctx.findExport(req.exportName);
        if (!exp) {
          error(Rep.ERR_UNKNOWN, `there is no export named '${req.exportName}'; exports: ${exportList(ctx)}`);
          break;
        }
        const bad = req.queries.find((q) => !q.includes(':'));
        if (bad !== undefined) {
          error(Rep.ERR_INVALID, `meta context query '${bad}' has no namespace (expected e.g. '${BASE_ALLOCATION}')`);
          break;
        }
        // base:allocation is our only context. LIST treats no queries and "base:" as wildcards; SET
        // selects exact names only. Unknown namespaces and leaf names are ignored, as the spec requires.
        const matches = set
          ? req.queries.includes(BASE_ALLOCATION)
          : req.queries.length === 0 || req.queries.some((q) => q === 'base:' || q === BASE_ALLOCATION);
        if (matches) {
          const id = set ? BASE_ALLOCATION_ID : 0;
          reply(Rep.META_CONTEXT, encodeRepMetaContext(id, BASE_ALLOCATION));
          if (set) meta = { export: exp, id };
        }
        reply(Rep.ACK);
        break;
      }

      case Opt.STARTTLS: {
        if (!ctx.tls) {
          error(Rep.ERR_UNSUP, 'this server does not offer TLS (started without --tls); connect without TLS');
          break;
        }
        if (secure) {
          error(Rep.ERR_INVALID, 'TLS is already in use on this connection');
          break;
        }
        if (data.length !== 0) {
          error(Rep.ERR_INVALID, `NBD_OPT_STARTTLS takes no data but ${data.length} bytes were sent`);
          break;
        }
        if (reader.bufferedBytes !== 0) {
          // The client must wait for our answer before it starts TLS: bytes already here cannot be TLS.
          throw new ProtocolViolation('client sent more data right after NBD_OPT_STARTTLS, before its answer');
        }
        reply(Rep.ACK);
        ({ socket, reader } = await ctx.tls.upgrade());
        secure = true;
        // Whatever was negotiated in clear does not carry over into TLS (proto.md).
        structuredReplies = false;
        meta = undefined;
        log.debug(`${ctx.label}: TLS established`);
        break;
      }

      default:
        error(Rep.ERR_UNSUP, `${name} is not supported by this server`);
    }
  }
}
