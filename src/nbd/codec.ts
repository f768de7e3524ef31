// Pure encoders and decoders for NBD messages, both directions: the server
// uses one half, the client (client.ts, and the protocol test client) the
// other. No I/O, no state. Decoders of client-supplied data throw
// CodecError with a message fit to send back in NBD_REP_ERR_INVALID.

import {
  EXPORT_NAME_PADDING,
  EXPORT_NAME_REPLY_SIZE,
  GREETING_SIZE,
  IHAVEOPT,
  Info,
  MAX_STRING_BYTES,
  NBD_MAGIC,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  REQUEST_HEADER_SIZE,
  REQUEST_MAGIC,
  Rep,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_HEADER_SIZE,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_SIZE,
  STRUCTURED_REPLY_MAGIC,
} from './protocol.ts';

/** Client data that does not parse. The message is safe to show the client. */
export class CodecError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CodecError';
  }
}

const TWO_32 = 2 ** 32;

/** Read a 64-bit unsigned value as a number; values past 2^53 lose precision but stay larger than any real size. */
function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO_32 + buf.readUInt32BE(at + 4);
}

/** Offsets and sizes go out per request: a safe integer is written as two halves, without a BigInt. */
function writeU64(buf: Buffer, value: number | bigint, at: number): void {
  if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) {
    buf.writeUInt32BE(Math.floor(value / TWO_32), at);
    buf.writeUInt32BE(value % TWO_32, at + 4);
    return;
  }
  buf.writeBigUInt64BE(BigInt(value), at);
}

function utf8(s: string): Buffer {
  return Buffer.from(s, 'utf8');
}

/** A string field read from the client: at most MAX_STRING_BYTES. */
function takeString(data: Buffer, at: number, length: number, what: string): string {
  if (length > MAX_STRING_BYTES) throw new CodecError(`${what} is ${length} bytes; the limit is ${MAX_STRING_BYTES}`);
  if (at + length > data.length) throw new CodecError(`${what} length ${length} runs past the end of the option data`);
  return data.toString('utf8', at, at + length);
}

// ---------------------------------------------------------------------------
// Handshake: greeting and client flags

export function encodeGreeting(handshakeFlags: number): Buffer {
  const buf = Buffer.alloc(GREETING_SIZE);
  buf.writeBigUInt64BE(NBD_MAGIC, 0);
  buf.writeBigUInt64BE(IHAVEOPT, 8);
  buf.writeUInt16BE(handshakeFlags, 16);
  return buf;
}

export interface Greeting {
  magic: bigint;
  optMagic: bigint;
  handshakeFlags: number;
}

export function decodeGreeting(buf: Buffer): Greeting {
  return { magic: buf.readBigUInt64BE(0), optMagic: buf.readBigUInt64BE(8), handshakeFlags: buf.readUInt16BE(16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const buf = Buffer.alloc(4);
  buf.writeUInt32BE(flags >>> 0, 0);
  return buf;
}

// ---------------------------------------------------------------------------
// Options

export interface OptionHeader {
  magic: bigint;
  option: number;
  length: number;
}

export function decodeOptionHeader(buf: Buffer): OptionHeader {
  return { magic: buf.readBigUInt64BE(0), option: buf.readUInt32BE(8), length: buf.readUInt32BE(12) };
}

export function encodeOptionRequest(option: number, data: Buffer = Buffer.alloc(0), length = data.length): Buffer {
  const buf = Buffer.alloc(OPTION_HEADER_SIZE + data.length);
  buf.writeBigUInt64BE(IHAVEOPT, 0);
  buf.writeUInt32BE(option >>> 0, 8);
  buf.writeUInt32BE(length >>> 0, 12);
  data.copy(buf, OPTION_HEADER_SIZE);
  return buf;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.alloc(OPTION_REPLY_HEADER_SIZE + data.length);
  buf.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  buf.writeUInt32BE(option >>> 0, 8);
  buf.writeUInt32BE(type >>> 0, 12);
  buf.writeUInt32BE(data.length, 16);
  data.copy(buf, OPTION_REPLY_HEADER_SIZE);
  return buf;
}

export interface OptionReplyHeader {
  magic: bigint;
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(buf: Buffer): OptionReplyHeader {
  return {
    magic: buf.readBigUInt64BE(0),
    option: buf.readUInt32BE(8),
    type: buf.readUInt32BE(12),
    length: buf.readUInt32BE(16),
  };
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO: the export name and the info types asked for. */
export interface InfoRequest {
  name: string;
  requests: number[];
}

export function encodeInfoRequest(req: InfoRequest): Buffer {
  const name = utf8(req.name);
  const buf = Buffer.alloc(4 + name.length + 2 + 2 * req.requests.length);
  buf.writeUInt32BE(name.length, 0);
  name.copy(buf, 4);
  buf.writeUInt16BE(req.requests.length, 4 + name.length);
  req.requests.forEach((r, i) => buf.writeUInt16BE(r, 6 + name.length + 2 * i));
  return buf;
}

export function decodeInfoRequest(data: Buffer): InfoRequest {
  if (data.length < 6) throw new CodecError(`option data is ${data.length} bytes; INFO/GO needs at least 6`);
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 6) {
    throw new CodecError(`export name length ${nameLength} does not fit in ${data.length} bytes of option data`);
  }
  const name = takeString(data, 4, nameLength, 'export name');
  const count = data.readUInt16BE(4 + nameLength);
  const rest = data.length - 6 - nameLength;
  if (rest !== 2 * count) {
    throw new CodecError(`${count} information requests need ${2 * count} bytes but ${rest} were sent`);
  }
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(6 + nameLength + 2 * i));
  return { name, requests };
}

/** Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

export function encodeMetaContextRequest(req: MetaContextRequest): Buffer {
  const name = utf8(req.exportName);
  const queries = req.queries.map(utf8);
  const buf = Buffer.alloc(4 + name.length + 4 + queries.reduce((n, q) => n + 4 + q.length, 0));
  let at = buf.writeUInt32BE(name.length, 0);
  at += name.copy(buf, at);
  at = buf.writeUInt32BE(queries.length, at);
  for (const q of queries) {
    at = buf.writeUInt32BE(q.length, at);
    at += q.copy(buf, at);
  }
  return buf;
}

export function decodeMetaContextRequest(data: Buffer): MetaContextRequest {
  if (data.length < 8) throw new CodecError(`option data is ${data.length} bytes; a meta context request needs 8`);
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) {
    throw new CodecError(`export name length ${nameLength} does not fit in ${data.length} bytes of option data`);
  }
  const exportName = takeString(data, 4, nameLength, 'export name');
  let at = 4 + nameLength;
  const count = data.readUInt32BE(at);
  at += 4;
  // Each query takes at least its 4-byte length: a count that cannot fit is rejected before any loop.
  if (count > (data.length - at) / 4) throw new CodecError(`${count} queries cannot fit in the option data`);
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) throw new CodecError(`query ${i + 1} of ${count} is missing`);
    const length = data.readUInt32BE(at);
    at += 4;
    queries.push(takeString(data, at, length, `query ${i + 1}`));
    at += length;
  }
  if (at !== data.length) throw new CodecError(`${data.length - at} stray bytes after the last query`);
  return { exportName, queries };
}

export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const buf = Buffer.alloc(12);
  buf.writeUInt16BE(Info.EXPORT, 0);
  writeU64(buf, size, 2);
  buf.writeUInt16BE(transmissionFlags, 10);
  return buf;
}

export function encodeInfoString(type: typeof Info.NAME | typeof Info.DESCRIPTION, text: string): Buffer {
  const s = utf8(text);
  const buf = Buffer.alloc(2 + s.length);
  buf.writeUInt16BE(type, 0);
  s.copy(buf, 2);
  return buf;
}

export interface BlockSizes {
  min: number;
  preferred: number;
  max: number;
}

export function encodeInfoBlockSize(sizes: BlockSizes): Buffer {
  const buf = Buffer.alloc(14);
  buf.writeUInt16BE(Info.BLOCK_SIZE, 0);
  buf.writeUInt32BE(sizes.min, 2);
  buf.writeUInt32BE(sizes.preferred, 6);
  buf.writeUInt32BE(sizes.max, 10);
  return buf;
}

export type InfoReply =
  | { type: typeof Info.EXPORT; size: number; flags: number }
  | { type: typeof Info.NAME; name: string }
  | { type: typeof Info.DESCRIPTION; description: string }
  | { type: typeof Info.BLOCK_SIZE; sizes: BlockSizes }
  | { type: number; raw: Buffer };

export function decodeInfoReply(data: Buffer): InfoReply {
  if (data.length < 2) throw new CodecError(`NBD_REP_INFO of ${data.length} bytes has no type`);
  const type = data.readUInt16BE(0);
  switch (type) {
    case Info.EXPORT:
      if (data.length !== 12) throw new CodecError(`NBD_INFO_EXPORT is ${data.length} bytes, not 12`);
      return { type, size: readU64(data, 2), flags: data.readUInt16BE(10) };
    case Info.NAME:
      return { type, name: data.toString('utf8', 2) };
    case Info.DESCRIPTION:
      return { type, description: data.toString('utf8', 2) };
    case Info.BLOCK_SIZE:
      if (data.length !== 14) throw new CodecError(`NBD_INFO_BLOCK_SIZE is ${data.length} bytes, not 14`);
      return {
        type,
        sizes: { min: data.readUInt32BE(2), preferred: data.readUInt32BE(6), max: data.readUInt32BE(10) },
      };
    default:
      return { type, raw: data.subarray(2) };
  }
}

export function encodeRepServer(name: string, description = ''): Buffer {
  const n = utf8(name);
  const d = utf8(description);
  const buf = Buffer.alloc(4 + n.length + d.length);
  buf.writeUInt32BE(n.length, 0);
  n.copy(buf, 4);
  d.copy(buf, 4 + n.length);
  return buf;
}

export function decodeRepServer(data: Buffer): { name: string; description: string } {
  if (data.length < 4) throw new CodecError('NBD_REP_SERVER shorter than 4 bytes');
  const length = data.readUInt32BE(0);
  if (length > data.length - 4) throw new CodecError('NBD_REP_SERVER name runs past the reply');
  return { name: data.toString('utf8', 4, 4 + length), description: data.toString('utf8', 4 + length) };
}

export function encodeRepMetaContext(id: number, name: string): Buffer {
  const n = utf8(name);
  const buf = Buffer.alloc(4 + n.length);
  buf.writeUInt32BE(id >>> 0, 0);
  n.copy(buf, 4);
  return buf;
}

export function decodeRepMetaContext(data: Buffer): { id: number; name: string } {
  if (data.length < 4) throw new CodecError('NBD_REP_META_CONTEXT shorter than 4 bytes');
  return { id: data.readUInt32BE(0), name: data.toString('utf8', 4) };
}

/** The reply to NBD_OPT_EXPORT_NAME: size, flags and, unless NO_ZEROES was negotiated, 124 zero bytes. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const buf = Buffer.alloc(EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_PADDING));
  writeU64(buf, size, 0);
  buf.writeUInt16BE(transmissionFlags, 8);
  return buf;
}

/** The client's view of the NBD_OPT_EXPORT_NAME reply (its first EXPORT_NAME_REPLY_SIZE bytes). */
export function decodeExportNameReply(buf: Buffer): { size: number; flags: number } {
  return { size: readU64(buf, 0), flags: buf.readUInt16BE(8) };
}

/** Any option error reply with a human-readable message (bounded by the spec's string limit). */
export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, truncateUtf8(message, MAX_STRING_BYTES));
}

export function encodeOptionAck(option: number): Buffer {
  return encodeOptionReply(option, Rep.ACK);
}

// ---------------------------------------------------------------------------
// Transmission: requests

export interface RequestHeader {
  magic: number;
  flags: number;
  type: number;
  cookie: bigint;
  /** May exceed 2^53 for hostile requests, in which case it is only approximately right (and out of range). */
  offset: number;
  length: number;
}

export function decodeRequestHeader(buf: Buffer, at = 0): RequestHeader {
  return {
    magic: buf.readUInt32BE(at),
    flags: buf.readUInt16BE(at + 4),
    type: buf.readUInt16BE(at + 6),
    cookie: buf.readBigUInt64BE(at + 8),
    offset: readU64(buf, at + 16),
    length: buf.readUInt32BE(at + 24),
  };
}

export interface RequestFields {
  magic?: number;
  flags?: number;
  type: number;
  cookie: bigint;
  offset: number | bigint;
  length: number;
}

export function encodeRequestHeader(req: RequestFields): Buffer {
  const buf = Buffer.alloc(REQUEST_HEADER_SIZE);
  buf.writeUInt32BE((req.magic ?? REQUEST_MAGIC) >>> 0, 0);
  buf.writeUInt16BE(req.flags ?? 0, 4);
  buf.writeUInt16BE(req.type, 6);
  buf.writeBigUInt64BE(req.cookie, 8);
  writeU64(buf, req.offset, 16);
  buf.writeUInt32BE(req.length >>> 0, 24);
  return buf;
}

/**
 * A request header whose cookie is below 2^32 (our client's counter), written
 * without making BigInts: the client sends one per request.
 */
export function encodeSmallCookieRequest(
  type: number,
  flags: number,
  cookie: number,
  offset: number,
  length: number,
): Buffer {
  const buf = Buffer.allocUnsafe(REQUEST_HEADER_SIZE);
  buf.writeUInt32BE(REQUEST_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  buf.writeUInt32BE(0, 8);
  buf.writeUInt32BE(cookie >>> 0, 12);
  writeU64(buf, offset, 16);
  buf.writeUInt32BE(length >>> 0, 24);
  return buf;
}

// ---------------------------------------------------------------------------
// Transmission: replies

/** Write a simple reply header at `at` (the caller owns the buffer, so a READ reply is one allocation). */
export function writeSimpleReplyHeader(buf: Buffer, at: number, error: number, cookie: bigint): void {
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  buf.writeUInt32BE(error >>> 0, at + 4);
  buf.writeBigUInt64BE(cookie, at + 8);
}

export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const buf = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_SIZE);
  writeSimpleReplyHeader(buf, 0, error, cookie);
  return buf;
}

export function writeStructuredHeader(
  buf: Buffer,
  at: number,
  flags: number,
  type: number,
  cookie: bigint,
  length: number,
): void {
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  buf.writeUInt16BE(flags, at + 4);
  buf.writeUInt16BE(type, at + 6);
  buf.writeBigUInt64BE(cookie, at + 8);
  buf.writeUInt32BE(length >>> 0, at + 16);
}

/** Bytes in front of the data of a final OFFSET_DATA chunk: chunk header plus the 64-bit offset. */
export const OFFSET_DATA_PREFIX = STRUCTURED_REPLY_HEADER_SIZE + 8;

/** Fill in the prefix of a final OFFSET_DATA chunk whose `dataLength` data bytes follow at OFFSET_DATA_PREFIX. */
export function writeOffsetDataPrefix(buf: Buffer, cookie: bigint, offset: number, dataLength: number): void {
  writeStructuredHeader(buf, 0, ReplyFlag.DONE, ReplyType.OFFSET_DATA, cookie, 8 + dataLength);
  writeU64(buf, offset, STRUCTURED_REPLY_HEADER_SIZE);
}

export function encodeNoneChunk(cookie: bigint): Buffer {
  const buf = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE);
  writeStructuredHeader(buf, 0, ReplyFlag.DONE, ReplyType.NONE, cookie, 0);
  return buf;
}

/** A final NBD_REPLY_TYPE_ERROR chunk with a message for humans. */
export function encodeErrorChunk(cookie: bigint, error: number, message: string): Buffer {
  const msg = truncateUtf8(message, MAX_STRING_BYTES);
  const buf = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + 6 + msg.length);
  writeStructuredHeader(buf, 0, ReplyFlag.DONE, ReplyType.ERROR, cookie, 6 + msg.length);
  buf.writeUInt32BE(error >>> 0, STRUCTURED_REPLY_HEADER_SIZE);
  buf.writeUInt16BE(msg.length, STRUCTURED_REPLY_HEADER_SIZE + 4);
  msg.copy(buf, STRUCTURED_REPLY_HEADER_SIZE + 6);
  return buf;
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

/** A final NBD_REPLY_TYPE_BLOCK_STATUS chunk for one metadata context. */
export function encodeBlockStatusChunk(cookie: bigint, contextId: number, extents: StatusDescriptor[]): Buffer {
  const payload = 4 + 8 * extents.length;
  const buf = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + payload);
  writeStructuredHeader(buf, 0, ReplyFlag.DONE, ReplyType.BLOCK_STATUS, cookie, payload);
  let at = buf.writeUInt32BE(contextId >>> 0, STRUCTURED_REPLY_HEADER_SIZE);
  for (const e of extents) {
    at = buf.writeUInt32BE(e.length >>> 0, at);
    at = buf.writeUInt32BE(e.flags >>> 0, at);
  }
  return buf;
}

export interface SimpleReplyHeader {
  magic: number;
  error: number;
  cookie: bigint;
}

export function decodeSimpleReplyHeader(buf: Buffer, at = 0): SimpleReplyHeader {
  return { magic: buf.readUInt32BE(at), error: buf.readUInt32BE(at + 4), cookie: buf.readBigUInt64BE(at + 8) };
}

export interface StructuredHeader {
  magic: number;
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

export function decodeStructuredHeader(buf: Buffer, at = 0): StructuredHeader {
  return {
    magic: buf.readUInt32BE(at),
    flags: buf.readUInt16BE(at + 4),
    type: buf.readUInt16BE(at + 6),
    cookie: buf.readBigUInt64BE(at + 8),
    length: buf.readUInt32BE(at + 16),
  };
}

export function decodeErrorPayload(payload: Buffer): { error: number; message: string; offset?: number } {
  if (payload.length < 6) throw new CodecError(`error chunk payload is ${payload.length} bytes; at least 6 expected`);
  const error = payload.readUInt32BE(0);
  const msgLength = payload.readUInt16BE(4);
  if (6 + msgLength > payload.length) throw new CodecError('error chunk message runs past the chunk');
  const message = payload.toString('utf8', 6, 6 + msgLength);
  const rest = payload.length - 6 - msgLength;
  if (rest >= 8) return { error, message, offset: readU64(payload, 6 + msgLength) };
  return { error, message };
}

export function decodeBlockStatusPayload(payload: Buffer): { contextId: number; extents: StatusDescriptor[] } {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) {
    throw new CodecError(`block status payload of ${payload.length} bytes is not 4 + 8n with n >= 1`);
  }
  const contextId = payload.readUInt32BE(0);
  const extents: StatusDescriptor[] = [];
  for (let at = 4; at < payload.length; at += 8) {
    extents.push({ length: payload.readUInt32BE(at), flags: payload.readUInt32BE(at + 4) });
  }
  return { contextId, extents };
}

export function decodeOffsetDataPayload(payload: Buffer): { offset: number; data: Buffer } {
  if (payload.length < 9) throw new CodecError(`OFFSET_DATA payload of ${payload.length} bytes; at least 9 expected`);
  return { offset: readU64(payload, 0), data: payload.subarray(8) };
}

export function decodeOffsetHolePayload(payload: Buffer): { offset: number; length: number } {
  if (payload.length !== 12) throw new CodecError(`OFFSET_HOLE payload of ${payload.length} bytes; 12 expected`);
  return { offset: readU64(payload, 0), length: payload.readUInt32BE(8) };
}

/** UTF-8 bytes of `text`, cut at a character boundary so they fit in `limit` bytes. */
export function truncateUtf8(text: string, limit: number): Buffer {
  const buf = utf8(text);
  if (buf.length <= limit) return buf;
  let end = limit;
  // Back off over continuation bytes (10xxxxxx) so no character is split.
  while (end > 0 && ((buf[end] ?? 0) & 0xc0) === 0x80) end--;
  return buf.subarray(0, end);
}
