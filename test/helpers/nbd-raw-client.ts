// A raw NBD client for tests: it speaks the protocol byte by byte, so a test
// can send well-formed traffic, hostile traffic (bad magic, unknown options,
// truncated frames) or anything in between, and read back exactly what the
// server answered. It does no validation of its own beyond framing.

import { createConnection, type Socket } from 'node:net';
import {
  decodeBlockStatusPayload,
  decodeErrorPayload,
  decodeGreeting,
  decodeInfoReply,
  decodeOffsetDataPayload,
  decodeOffsetHolePayload,
  decodeOptionReplyHeader,
  decodeSimpleReplyHeader,
  decodeStructuredHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOptionRequest,
  encodeRequestHeader,
  type Greeting,
  type InfoReply,
  type RequestFields,
  type StatusDescriptor,
} from '../../src/nbd/codec.ts';
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  Info,
  isErrorChunk,
  isErrorReply,
  OPTION_REPLY_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  Opt,
  Rep,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from '../../src/nbd/protocol.ts';
import { ConnectionClosed, SocketReader } from '../../src/nbd/reader.ts';

export type Target = { path: string } | { host: string; port: number };

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface HandshakeOptions {
  /** Export to select; default "". */
  name?: string;
  /** Negotiate structured replies (default false). */
  structured?: boolean;
  /** Select base:allocation (implies structured). */
  blockStatus?: boolean;
  /** Enter transmission with NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO. */
  exportName?: boolean;
  /** Client flags to send (default C_FIXED_NEWSTYLE | C_NO_ZEROES). */
  clientFlags?: number;
}

export interface Negotiation {
  size: number;
  flags: number;
  infos: InfoReply[];
}

/** One message of the transmission phase, as the server sent it. */
export type Message =
  | { kind: 'simple'; cookie: bigint; error: number; data: Buffer | undefined }
  | { kind: 'chunk'; cookie: bigint; flags: number; type: number; payload: Buffer };

/** A request's complete reply: a simple reply, or every structured chunk up to DONE. */
export interface Reply {
  cookie: bigint;
  structured: boolean;
  /** 0 on success; the first error chunk's (or the simple reply's) error otherwise. */
  error: number;
  /** The error chunk's human-readable message, if any. */
  message: string;
  /** READ data reassembled from OFFSET_DATA and OFFSET_HOLE chunks (or the simple reply's payload). */
  data: Buffer | undefined;
  /** BLOCK_STATUS chunks. */
  status: { contextId: number; extents: StatusDescriptor[] }[];
  chunks: { flags: number; type: number; payload: Buffer }[];
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  chunks: { flags: number; type: number; payload: Buffer }[];
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
}

export class RawNbdClient {
  readonly socket: Socket;
  readonly reader: SocketReader;
  /** Resolves when the socket has closed, for whatever reason. */
  readonly closed: Promise<void>;
  private readonly sent = new Map<bigint, { type: number; offset: number; length: number }>();
  private readonly waiting = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private pumping = false;

  private constructor(socket: Socket) {
    this.socket = socket;
    this.reader = new SocketReader(socket, { highWaterMark: 64 * 1024 * 1024 });
    this.closed = new Promise((resolve) => {
      socket.once('close', () => {
        resolve();
      });
    });
    socket.on('error', () => {
      // Resets are part of what these tests provoke; the reader reports them as ConnectionClosed.
    });
  }

  static connect(target: Target): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const socket = 'path' in target ? createConnection(target.path) : createConnection(target.port, target.host);
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new RawNbdClient(socket));
      });
    });
  }

  /** Connect and complete a handshake. */
  static async open(target: Target, options: HandshakeOptions = {}): Promise<{ client: RawNbdClient } & Negotiation> {
    const client = await RawNbdClient.connect(target);
    const n = await client.handshake(options);
    return { client, ...n };
  }

  send(...bufs: Buffer[]): void {
    for (const b of bufs) this.socket.write(b);
  }

  read(n: number): Promise<Buffer> {
    return this.reader.read(n);
  }

  /** Resolves when the server has closed the connection (EOF or reset), without further data. */
  async expectClose(): Promise<void> {
    try {
      const extra = await this.reader.read(1);
      throw new Error(`expected the server to close the connection, got byte 0x${extra.toString('hex')}`);
    } catch (err) {
      if (!(err instanceof ConnectionClosed)) throw err;
    }
  }

  /** Half-close: we send nothing more. */
  end(): void {
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }

  // -------------------------------------------------------------------------
  // Handshake

  async readGreeting(): Promise<Greeting> {
    return decodeGreeting(await this.read(18));
  }

  sendClientFlags(flags: number): void {
    this.send(encodeClientFlags(flags));
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), length = data.length): void {
    this.send(encodeOptionRequest(option, data, length));
  }

  async readOptionReply(): Promise<OptionReply> {
    const h = decodeOptionReplyHeader(await this.read(OPTION_REPLY_HEADER_SIZE));
    if (h.magic !== OPTION_REPLY_MAGIC) throw new Error(`bad option reply magic 0x${h.magic.toString(16)}`);
    const data = h.length > 0 ? await this.read(h.length) : Buffer.alloc(0);
    return { option: h.option, type: h.type, data };
  }

  /** Send an option and collect its replies up to the final one (ACK or an error). */
  async option(option: number, data?: Buffer): Promise<OptionReply[]> {
    this.sendOption(option, data);
    const replies: OptionReply[] = [];
    for (;;) {
      const r = await this.readOptionReply();
      if (r.option !== option) throw new Error(`reply for option ${r.option} while waiting for ${option}`);
      replies.push(r);
      if (r.type === Rep.ACK || isErrorReply(r.type)) return replies;
    }
  }

  /** NBD_OPT_INFO or NBD_OPT_GO; throws if the final reply is an error. */
  async info(option: typeof Opt.INFO | typeof Opt.GO, name: string, requests: number[]): Promise<Negotiation> {
    const replies = await this.option(option, encodeInfoRequest({ name, requests }));
    const last = replies[replies.length - 1];
    if (!last || last.type !== Rep.ACK) {
      throw new Error(`option ${option} failed: reply 0x${last?.type.toString(16)} ${last?.data.toString() ?? ''}`);
    }
    const infos = replies.filter((r) => r.type === Rep.INFO).map((r) => decodeInfoReply(r.data));
    const exp = infos.find((i) => i.type === Info.EXPORT);
    if (!exp || !('size' in exp)) throw new Error('no NBD_INFO_EXPORT in the reply');
    return { size: exp.size, flags: exp.flags, infos };
  }

  async handshake(options: HandshakeOptions = {}): Promise<Negotiation> {
    await this.readGreeting();
    this.sendClientFlags(options.clientFlags ?? ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES);
    const name = options.name ?? '';
    if (options.structured === true || options.blockStatus === true) {
      const r = await this.option(Opt.STRUCTURED_REPLY);
      if (r[0]?.type !== Rep.ACK) throw new Error('structured replies refused');
    }
    if (options.blockStatus === true) {
      const r = await this.option(
        Opt.SET_META_CONTEXT,
        encodeMetaContextRequest({ exportName: name, queries: [BASE_ALLOCATION] }),
      );
      if (r[r.length - 1]?.type !== Rep.ACK || r.length !== 2) throw new Error('base:allocation not selected');
    }
    if (options.exportName === true) {
      this.sendOption(Opt.EXPORT_NAME, Buffer.from(name));
      const noZeroes = ((options.clientFlags ?? ClientFlag.C_NO_ZEROES) & ClientFlag.C_NO_ZEROES) !== 0;
      const reply = await this.read(noZeroes ? 10 : 134);
      return { size: Number(reply.readBigUInt64BE(0)), flags: reply.readUInt16BE(8), infos: [] };
    }
    return this.info(Opt.GO, name, [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]);
  }

  // -------------------------------------------------------------------------
  // Transmission

  /** Send a request header (and payload) as given; the cookie is remembered so a simple READ reply can be framed. */
  sendRequest(fields: RequestFields, payload?: Buffer): void {
    this.sent.set(fields.cookie, { type: fields.type, offset: Number(fields.offset), length: fields.length });
    const header = encodeRequestHeader(fields);
    if (payload) this.send(Buffer.concat([header, payload]));
    else this.send(header);
  }

  /** Read the next message (simple reply or one structured chunk). Only for tests that do not use request(). */
  async nextMessage(): Promise<Message> {
    const magicBytes = await this.read(4);
    const magic = magicBytes.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const h = decodeSimpleReplyHeader(Buffer.concat([magicBytes, await this.read(12)]));
      const req = this.sent.get(h.cookie);
      let data: Buffer | undefined;
      if (h.error === 0 && req?.type === Cmd.READ)
        data = req.length > 0 ? await this.read(req.length) : Buffer.alloc(0);
      return { kind: 'simple', cookie: h.cookie, error: h.error, data };
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      const h = decodeStructuredHeader(Buffer.concat([magicBytes, await this.read(16)]));
      const payload = h.length > 0 ? await this.read(h.length) : Buffer.alloc(0);
      return { kind: 'chunk', cookie: h.cookie, flags: h.flags, type: h.type, payload };
    }
    throw new Error(`unexpected reply magic 0x${magic.toString(16)}`);
  }

  /** Read messages up to the end of the next complete reply. */
  async nextReply(): Promise<Reply> {
    const chunks = new Map<bigint, { flags: number; type: number; payload: Buffer }[]>();
    for (;;) {
      const m = await this.nextMessage();
      if (m.kind === 'simple') return this.simpleReply(m.cookie, m.error, m.data);
      const list = chunks.get(m.cookie) ?? [];
      list.push({ flags: m.flags, type: m.type, payload: m.payload });
      chunks.set(m.cookie, list);
      if (m.flags & ReplyFlag.DONE) return this.assemble(m.cookie, list);
    }
  }

  /** Send a request and resolve with its reply; many may be outstanding (replies are matched by cookie). */
  request(fields: Omit<RequestFields, 'cookie'> & { cookie?: bigint }, payload?: Buffer): Promise<Reply> {
    const cookie = fields.cookie ?? this.nextCookie++;
    const p = new Promise<Reply>((resolve, reject) => {
      this.waiting.set(cookie, {
        type: fields.type,
        offset: Number(fields.offset),
        length: fields.length,
        chunks: [],
        resolve,
        reject,
      });
    });
    this.sendRequest({ ...fields, cookie }, payload);
    this.pump();
    return p;
  }

  readAt(offset: number, length: number, flags = 0): Promise<Reply> {
    return this.request({ type: Cmd.READ, offset, length, flags });
  }

  writeAt(offset: number, data: Buffer, flags = 0): Promise<Reply> {
    return this.request({ type: Cmd.WRITE, offset, length: data.length, flags }, data);
  }

  /** NBD_CMD_DISC, then half-close. */
  disconnect(): void {
    this.send(encodeRequestHeader({ type: Cmd.DISC, cookie: 0n, offset: 0, length: 0 }));
    this.socket.end();
  }

  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    void (async () => {
      try {
        while (this.waiting.size > 0) {
          const m = await this.nextMessage();
          const w = this.waiting.get(m.cookie);
          if (!w) throw new Error(`reply with unknown cookie ${m.cookie}`);
          if (m.kind === 'simple') {
            this.waiting.delete(m.cookie);
            w.resolve(this.simpleReply(m.cookie, m.error, m.data));
            continue;
          }
          w.chunks.push({ flags: m.flags, type: m.type, payload: m.payload });
          if (m.flags & ReplyFlag.DONE) {
            this.waiting.delete(m.cookie);
            w.resolve(this.assemble(m.cookie, w.chunks));
          }
        }
      } catch (err) {
        const e = err instanceof Error ? err : new Error(String(err));
        for (const w of this.waiting.values()) w.reject(e);
        this.waiting.clear();
      } finally {
        this.pumping = false;
      }
    })();
  }

  private simpleReply(cookie: bigint, error: number, data: Buffer | undefined): Reply {
    this.sent.delete(cookie);
    return { cookie, structured: false, error, message: '', data, status: [], chunks: [] };
  }

  private assemble(cookie: bigint, chunks: { flags: number; type: number; payload: Buffer }[]): Reply {
    const req = this.sent.get(cookie);
    this.sent.delete(cookie);
    const reply: Reply = { cookie, structured: true, error: 0, message: '', data: undefined, status: [], chunks };
    for (const c of chunks) {
      if (isErrorChunk(c.type)) {
        const e = decodeErrorPayload(c.payload);
        if (reply.error === 0) {
          reply.error = e.error;
          reply.message = e.message;
        }
      } else if (c.type === ReplyType.OFFSET_DATA || c.type === ReplyType.OFFSET_HOLE) {
        if (!req) throw new Error('read data for an unknown request');
        reply.data ??= Buffer.alloc(req.length);
        if (c.type === ReplyType.OFFSET_DATA) {
          const d = decodeOffsetDataPayload(c.payload);
          d.data.copy(reply.data, d.offset - req.offset);
        } else {
          const h = decodeOffsetHolePayload(c.payload);
          reply.data.fill(0, h.offset - req.offset, h.offset - req.offset + h.length);
        }
      } else if (c.type === ReplyType.BLOCK_STATUS) {
        reply.status.push(decodeBlockStatusPayload(c.payload));
      } else if (c.type !== ReplyType.NONE) {
        throw new Error(`unknown chunk type ${c.type}`);
      }
    }
    if (req?.type === Cmd.READ && reply.error === 0) reply.data ??= Buffer.alloc(0);
    return reply;
  }
}
