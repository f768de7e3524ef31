// /sys/block/bcacheN/bcache/ of a flash-only volume (sysfs.c bch_flash_dev,
// bcache.md §3.7): exactly the kernel's three files, `unregister` (delete the
// volume), `label` and `size`; and the human-size parser (strtoi_h) that
// `size` and the set's `flash_vol_create` share.

import type { FlashDev } from '../flash-dev.ts';
import { hprint } from '../stats.ts';
import type { TreeContext } from './context.ts';
import { dir, rw, SysfsError, wo, type SysfsDir } from './node.ts';

const SUFFIXES = 'kmgtpezy';

/**
 * strtoi_h for a u64 (bch_strtoull_h): a whole number with an optional
 * suffix k, m, g, t, p, e, z or y (either case, powers of 1024), a trailing
 * newline allowed. ubcache refuses values past 2^53 bytes (the kernel's limit
 * is 2^64), which no cache device reaches.
 */
export function parseHumanSize(name: string, text: string): number {
  const t = text.endsWith('\n') ? text.slice(0, -1) : text;
  const m = /^\+?([0-9]+)([a-zA-Z]?)$/.exec(t);
  const accepts = 'a size in bytes with an optional k, M, G, T, P or E suffix (powers of 1024)';
  if (!m) throw new SysfsError('EINVAL', `${name}: "${text}" is not ${accepts}`);
  const suffix = (m[2] ?? '').toLowerCase();
  const power = suffix === '' ? 0 : SUFFIXES.indexOf(suffix) + 1;
  if (power === 0 && suffix !== '')
    throw new SysfsError('EINVAL', `${name}: unknown suffix "${m[2] ?? ''}" (${accepts})`);
  const v = Number(m[1]) * 1024 ** power;
  if (!Number.isSafeInteger(v)) throw new SysfsError('EINVAL', `${name}: ${t} is too large`);
  return v;
}

/** The label as the kernel shows it: the slot's bytes up to the first NUL, and a newline. */
function labelText(label: Buffer): string {
  const nul = label.indexOf(0);
  return label.subarray(0, nul < 0 ? label.length : nul).toString();
}

export function flashDir(ctx: TreeContext, vol: FlashDev): SysfsDir {
  return dir(() => [
    [
      'unregister',
      wo(() => {
        ctx.background(`deleting flash volume ${vol.name}`, () => ctx.registry.unregisterVolume(vol));
      }),
    ],
    [
      'label',
      rw(
        () => labelText(vol.label),
        // The kernel copies the written bytes as they are (a trailing newline included).
        (text) => vol.setLabel(text),
      ),
    ],
    [
      'size',
      rw(
        () => hprint(vol.sectors * 512),
        (text) => vol.setSize(parseHumanSize('size', text)),
      ),
    ],
  ]);
}
