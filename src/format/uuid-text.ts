// UUIDs as bcache stores them (16 raw bytes, RFC 4122 byte order, the order
// libuuid's uuid_unparse prints) and as people type them.

const UUID_RE = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

/** The canonical lower-case text form of the 16 bytes at `offset`, as uuid_unparse prints it. */
export function formatUuid(bytes: Uint8Array, offset = 0): string {
  if (offset < 0 || offset + 16 > bytes.length) {
    throw new RangeError(`formatUuid: 16 bytes at ${offset} do not fit in ${bytes.length}`);
  }
  const h = Buffer.from(bytes.buffer, bytes.byteOffset + offset, 16).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The 16 bytes of a text UUID (any case, with dashes as uuid_parse wants them), or undefined if it is not one. */
export function parseUuid(text: string): Buffer | undefined {
  if (!UUID_RE.test(text)) return undefined;
  return Buffer.from(text.replace(/-/g, ''), 'hex');
}

export function isZeroUuid(bytes: Uint8Array): boolean {
  return bytes.every((b) => b === 0);
}
