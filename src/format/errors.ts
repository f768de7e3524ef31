// The one error the codecs throw: bytes that are not what bcache would have
// written. It names the structure and the field so a message like
// "jset.csum: stored 0x1234 but the entry checksums to 0x5678" points at the
// problem without a debugger.

export class FormatError extends Error {
  /** cache_sb, bkey, bset, btree_node, jset, prio_set, uuid_entry, ... */
  readonly structure: string;
  /** The field at fault (magic, csum, version, keys, ...). */
  readonly field: string;
  constructor(structure: string, field: string, message: string) {
    super(`${structure}.${field}: ${message}`);
    this.name = 'FormatError';
    this.structure = structure;
    this.field = field;
  }
}

/** Hex for messages: 0x-prefixed, lower case. */
export function hex(v: bigint | number): string {
  return `0x${v.toString(16)}`;
}
