// A scripted NBD server for the client's tests of broken and hostile
// servers, the one place where no real server fits: real servers do not send
// garbage magic, unknown cookies or oversized chunks on purpose. It speaks a
// correct fixed-newstyle handshake (configurable: no GO, no structured
// replies, an oldstyle greeting, silence) and then hands every request to the
// test, which answers with whatever bytes it wants.

import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import {
  decodeOptionHeader,
  decodeRequestHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeSimpleReply,
  writeStructuredHeader,
  type BlockSizes,
} from '../../src/nbd/codec.ts';
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  HandshakeFlag,
  Opt,
  Rep,
  ReplyFlag,
  ReplyType,
  STRUCTURED_REPLY_HEADER_SIZE,
  TxFlag,
} from '../../src/nbd/protocol.ts';
import { SocketReader } from '../../src/nbd/reader.ts';

export interface FakeRequest {
  type: number;
  flags: number;
  cookie: bigint;
  offset: number;
  length: number;
  payload: Buffer | undefined;
}

export interface FakeOptions {
  /** Bytes sent instead of the greeting (e.g. an oldstyle one). */
  greeting?: Buffer;
  /** Send nothing at all. */
  silent?: boolean;
  handshakeFlags?: number;
  /** Accept NBD_OPT_STRUCTURED_REPLY (default true). */
  structured?: boolean;
  /** Select base:allocation under this id (default 7); null refuses it. */
  metaContextId?: number | null;
  /** Answer NBD_OPT_GO with NBD_REP_ERR_UNSUP (an old server). */
  goUnsupported?: boolean;
  size?: number;
  flags?: number;
  blockSize?: BlockSizes;
  /** Every request of the transmission phase; the test replies through `conn`. */
  onRequest?: (req: FakeRequest, conn: FakeConnection) => void;
}

export class FakeConnection {
  readonly socket: Socket;
  readonly requests: FakeRequest[] = [];
  constructor(socket: Socket) {
    this.socket = socket;
  }
  send(...bufs: Buffer[]): void {
    if (!this.socket.destroyed) this.socket.write(Buffer.concat(bufs));
  }
  destroy(): void {
    this.socket.destroy();
  }
}

export const DEFAULT_FAKE_FLAGS =
  TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES;

/** A structured chunk with the given flags, type and payload. */
export function chunk(cookie: bigint, type: number, payload: Buffer, done: boolean): Buffer {
  const buf = Buffer.alloc(STRUCTURED_REPLY_HEADER_SIZE + payload.length);
  writeStructuredHeader(buf, 0, done ? ReplyFlag.DONE : 0, type, cookie, payload.length);
  payload.copy(buf, STRUCTURED_REPLY_HEADER_SIZE);
  return buf;
}

export function dataChunk(cookie: bigint, offset: number, data: Buffer, done: boolean): Buffer {
  const p = Buffer.alloc(8 + data.length);
  p.writeBigUInt64BE(BigInt(offset), 0);
  data.copy(p, 8);
  return chunk(cookie, ReplyType.OFFSET_DATA, p, done);
}

export function holeChunk(cookie: bigint, offset: number, length: number, done: boolean): Buffer {
  const p = Buffer.alloc(12);
  p.writeBigUInt64BE(BigInt(offset), 0);
  p.writeUInt32BE(length, 8);
  return chunk(cookie, ReplyType.OFFSET_HOLE, p, done);
}

export function simple(cookie: bigint, error = 0, data?: Buffer): Buffer {
  return data ? Buffer.concat([encodeSimpleReply(error, cookie), data]) : encodeSimpleReply(error, cookie);
}

export interface FakeServer {
  uri: string;
  connections: FakeConnection[];
  close(): Promise<void>;
}

async function handshake(socket: Socket, reader: SocketReader, o: FakeOptions): Promise<boolean> {
  socket.write(
    o.greeting ?? encodeGreeting(o.handshakeFlags ?? HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES),
  );
  if (o.greeting) {
    socket.end();
    return false;
  }
  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  const noZeroes = (clientFlags & ClientFlag.C_NO_ZEROES) !== 0;
  const size = o.size ?? 1024 * 1024;
  const flags = o.flags ?? DEFAULT_FAKE_FLAGS;
  for (;;) {
    const h = decodeOptionHeader(await reader.read(16));
    if (h.length > 0) await reader.read(h.length);
    const reply = (type: number, data?: Buffer): void => {
      socket.write(encodeOptionReply(h.option, type, data));
    };
    switch (h.option) {
      case Opt.EXPORT_NAME:
        socket.write(encodeExportNameReply(size, flags, noZeroes));
        return true;
      case Opt.STRUCTURED_REPLY:
        reply(o.structured === false ? Rep.ERR_UNSUP : Rep.ACK);
        break;
      case Opt.SET_META_CONTEXT: {
        const id = o.metaContextId === undefined ? 7 : o.metaContextId;
        if (id !== null) reply(Rep.META_CONTEXT, encodeRepMetaContext(id, BASE_ALLOCATION));
        reply(Rep.ACK);
        break;
      }
      case Opt.GO:
        if (o.goUnsupported === true) {
          reply(Rep.ERR_UNSUP, Buffer.from('no GO here'));
          break;
        }
        reply(Rep.INFO, encodeInfoExport(size, flags));
        if (o.blockSize) reply(Rep.INFO, encodeInfoBlockSize(o.blockSize));
        reply(Rep.ACK);
        return true;
      default:
        reply(Rep.ERR_UNSUP);
    }
  }
}

async function serve(socket: Socket, o: FakeOptions, conn: FakeConnection): Promise<void> {
  const reader = new SocketReader(socket, { highWaterMark: 64 * 1024 * 1024 });
  if (o.silent === true) return;
  if (!(await handshake(socket, reader, o))) return;
  for (;;) {
    const h = decodeRequestHeader(await reader.read(28));
    const payload = h.type === Cmd.WRITE && h.length > 0 ? await reader.read(h.length) : undefined;
    if (h.type === Cmd.DISC) {
      socket.end();
      return;
    }
    const req: FakeRequest = {
      type: h.type,
      flags: h.flags,
      cookie: h.cookie,
      offset: h.offset,
      length: h.length,
      payload,
    };
    conn.requests.push(req);
    o.onRequest?.(req, conn);
  }
}

export async function startFakeServer(dir: string, options: FakeOptions = {}): Promise<FakeServer> {
  const path = join(dir, 'fake.sock');
  const connections: FakeConnection[] = [];
  const server: Server = createServer((socket) => {
    socket.on('error', () => {
      // The client hanging up on a misbehaving server is what these tests expect.
    });
    const conn = new FakeConnection(socket);
    connections.push(conn);
    serve(socket, options, conn).catch(() => {
      // Connection closed under the script: nothing more to do.
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return {
    uri: `nbd+unix:///?socket=${path}`,
    connections,
    close: async () => {
      for (const c of connections) c.destroy();
      await new Promise<void>((resolve) =>
        server.close(() => {
          resolve();
        }),
      );
    },
  };
}
