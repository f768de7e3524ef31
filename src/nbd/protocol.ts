// NBD protocol numbers (NetworkBlockDevice/nbd doc/proto.md) and the mapping
// from host errno names to the handful of error values the protocol allows.
// Everything on the wire is big-endian. Constants are grouped in frozen
// objects so that a name like `Cmd.WRITE` reads as it does in the spec.

/** "NBDMAGIC": the first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": the second server magic and the prefix of every option request. */
export const IHAVEOPT = 0x49484156454f5054n;
/** The second magic of an oldstyle server (the pre-2011 handshake nobody should speak any more). */
export const OLDSTYLE_MAGIC = 0x00420281861253n;
/** Prefix of every fixed-newstyle option reply. */
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const GREETING_SIZE = 18;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_HEADER_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;
/** The NBD_OPT_EXPORT_NAME reply before its padding: 64-bit size and 16-bit transmission flags. */
export const EXPORT_NAME_REPLY_SIZE = 10;
/** Padding after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was negotiated. */
export const EXPORT_NAME_PADDING = 124;
/** The spec's limit for any string: export names, descriptions, messages. */
export const MAX_STRING_BYTES = 4096;

/** Handshake flags (server, 16 bit). */
export const HandshakeFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags (32 bit). */
export const ClientFlag = {
  C_FIXED_NEWSTYLE: 1 << 0,
  C_NO_ZEROES: 1 << 1,
} as const;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const REP_ERR = 0x80000000;

export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
} as const;

export function isErrorReply(type: number): boolean {
  return type >= REP_ERR;
}

export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags (16 bit), sent in NBD_INFO_EXPORT or the EXPORT_NAME reply. */
export const TxFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** Command flags (16 bit). */
export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

export const ReplyFlag = {
  DONE: 1 << 0,
} as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;

export function isErrorChunk(type: number): boolean {
  return (type & (1 << 15)) !== 0;
}

/** The most descriptors one BLOCK_STATUS chunk may carry (proto.md, "Metadata querying"). */
export const MAX_STATUS_DESCRIPTORS = 1 << 20;

/** base:allocation status flags. */
export const State = {
  HOLE: 1 << 0,
  ZERO: 1 << 1,
} as const;

export const BASE_ALLOCATION = 'base:allocation';

/** The only error values allowed on the wire. */
export const NbdErr = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export type NbdError = (typeof NbdErr)[keyof typeof NbdErr];

const errnoToNbd: Record<string, NbdError> = {
  EPERM: NbdErr.EPERM,
  EACCES: NbdErr.EPERM,
  EROFS: NbdErr.EPERM,
  EIO: NbdErr.EIO,
  ENOMEM: NbdErr.ENOMEM,
  EINVAL: NbdErr.EINVAL,
  ENOSPC: NbdErr.ENOSPC,
  EDQUOT: NbdErr.ENOSPC,
  EFBIG: NbdErr.ENOSPC,
  EOVERFLOW: NbdErr.EOVERFLOW,
  ENOTSUP: NbdErr.ENOTSUP,
  EOPNOTSUPP: NbdErr.ENOTSUP,
  ESHUTDOWN: NbdErr.ESHUTDOWN,
};

/** Map a host errno name (IoError.code, a Node fs error's code) to an NBD error; anything unknown is EIO. */
export function nbdErrorFromErrno(code: string): NbdError {
  return errnoToNbd[code] ?? NbdErr.EIO;
}

/** The errno names an NBD error value stands for, the other direction of nbdErrorFromErrno. */
export type NbdErrnoName = keyof typeof NbdErr;

/**
 * Name tables, built once: the lookups below run per request on the hot path
 * (the client counts requests by command name), where scanning
 * Object.entries() allocated an array of pairs per call.
 */
function nameTable(values: Record<string, number>, prefix = ''): Map<number, string> {
  const m = new Map<number, string>();
  for (const [name, v] of Object.entries(values)) if (!m.has(v)) m.set(v, prefix + name);
  return m;
}
const nbdErrorNames = nameTable(NbdErr);
const commandNames = nameTable(Cmd);
const optionNames = nameTable(Opt, 'NBD_OPT_');
const replyTypeNames = nameTable(Rep, 'NBD_REP_');

/** The errno name of an NBD error value from the wire; values the spec does not define are EINVAL, as it says. */
export function errnoFromNbdError(value: number): NbdErrnoName {
  return (nbdErrorNames.get(value) as NbdErrnoName | undefined) ?? 'EINVAL';
}

/** Human names for logs and test messages. */
export function nbdErrorName(value: number): string {
  return nbdErrorNames.get(value) ?? `error ${value}`;
}

export function commandName(type: number): string {
  return commandNames.get(type) ?? `command ${type}`;
}

export function optionName(option: number): string {
  return optionNames.get(option) ?? `option ${option}`;
}

export function replyTypeName(type: number): string {
  return replyTypeNames.get(type) ?? `reply ${type}`;
}

/** Largest READ/WRITE payload we advertise and accept by default (2^25, the spec's interoperable maximum). */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
