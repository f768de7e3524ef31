// How the kernel reads a set uuid written to a backing device's `attach`
// file (bch_parse_uuid): it scans the leading run of characters from
// "-0123456789:ABCDEFabcdef", packs up to 32 hex digits in order (those
// missing stay 0), and refuses the write if that run is shorter than 16
// characters. Anything after the run (a newline, say) is ignored.

import { formatUuid } from '../../format/uuid-text.ts';

const UUID_CHARS = /^[-0-9:A-Fa-f]*/;

/** The canonical uuid text the kernel would compare, or undefined where it returns EINVAL. */
export function parseUuidPrefix(text: string): string | undefined {
  const run = UUID_CHARS.exec(text)?.[0] ?? '';
  if (run.length < 16) return undefined;
  const bytes = Buffer.alloc(16);
  let j = 0;
  for (const c of run) {
    if (j >= 32) break;
    if (c === '-' || c === ':') continue;
    const v = parseInt(c, 16);
    bytes[j >> 1] = (bytes[j >> 1] ?? 0) | (j % 2 === 0 ? v << 4 : v);
    j++;
  }
  return formatUuid(bytes);
}
