// What is already on a device, before `ubcache make` overwrites it.
//
// Our own probe recognises the common signatures from the first bytes of the
// device, so the check works without any tool installed; when blkid(8) is
// there, `blkid -p` is asked too and anything it knows (hundreds of formats)
// counts. make-bcache leaves all of this to libblkid, which since util-linux
// 2.24 also recognises bcache itself, so its --wipe-bcache never worked; here
// bcache is told apart and only --wipe-bcache lets it be overwritten.

import { spawnSync } from 'node:child_process';
import { BCACHE_SB_MAX_VERSION, SB_OFFSET } from '../format/constants.ts';
import { hasBcacheMagic, readSuperblockFields } from '../format/superblock.ts';
import { formatUuid } from '../format/uuid-text.ts';

/** How much of the device's start findSignatures() wants to see. */
export const PROBE_BYTES = 128 * 1024;

export interface Signature {
  /** Short name: ext4, xfs, btrfs, swap, dos, gpt, luks, ... */
  type: string;
  /** What it is, for a message: "an ext4 file system". */
  description: string;
  /** Where the evidence is, for a message: "magic 0xEF53 at byte 1080". */
  where: string;
}

export interface BcacheSignature {
  version: number;
  kind: 'cache device' | 'backing device';
  uuid: string;
  setUuid: string;
}

function ascii(buf: Buffer, at: number, text: string): boolean {
  return at + text.length <= buf.length && buf.toString('latin1', at, at + text.length) === text;
}

function u16(buf: Buffer, at: number): number | undefined {
  return at + 2 <= buf.length ? buf.readUInt16LE(at) : undefined;
}

function u32(buf: Buffer, at: number): number | undefined {
  return at + 4 <= buf.length ? buf.readUInt32LE(at) : undefined;
}

function extKind(head: Buffer): string {
  const compat = u32(head, 1024 + 92) ?? 0;
  const incompat = u32(head, 1024 + 96) ?? 0;
  const roCompat = u32(head, 1024 + 100) ?? 0;
  // ext4-only features: extents, 64bit, flex_bg; huge_file, dir_nlink, extra_isize, metadata_csum.
  if ((incompat & (0x40 | 0x80 | 0x200)) !== 0 || (roCompat & (0x8 | 0x20 | 0x40 | 0x400)) !== 0) return 'ext4';
  return (compat & 0x4) !== 0 ? 'ext3' : 'ext2';
}

/**
 * Foreign signatures in the first bytes of a device (PROBE_BYTES of them, or
 * all of a smaller device). bcache's own superblock is not reported here:
 * see bcacheSignature().
 */
export function findSignatures(head: Buffer): Signature[] {
  const found: Signature[] = [];
  const add = (type: string, description: string, where: string): void => {
    found.push({ type, description, where });
  };
  if (u16(head, 1024 + 56) === 0xef53) {
    const kind = extKind(head);
    add(kind, `an ${kind} file system`, 'magic 0xEF53 at byte 1080');
  }
  if (ascii(head, 0, 'XFSB')) add('xfs', 'an XFS file system', '"XFSB" at byte 0');
  if (ascii(head, 0x10040, '_BHRfS_M')) add('btrfs', 'a btrfs file system', '"_BHRfS_M" at byte 65600');
  for (const page of [4096, 8192, 16384, 32768, 65536]) {
    for (const magic of ['SWAPSPACE2', 'SWAP-SPACE']) {
      if (ascii(head, page - 10, magic)) add('swap', 'swap space', `"${magic}" at byte ${page - 10}`);
    }
  }
  if (ascii(head, 0, 'LUKS\xba\xbe')) add('crypto_LUKS', 'a LUKS encrypted volume', '"LUKS" at byte 0');
  for (const sector of [0, 1, 2, 3]) {
    if (ascii(head, sector * 512, 'LABELONE') && ascii(head, sector * 512 + 24, 'LVM2')) {
      add('LVM2_member', 'an LVM physical volume', `"LABELONE" at byte ${sector * 512}`);
    }
  }
  for (const at of [0, 4096]) {
    if (u32(head, at) === 0xa92b4efc) add('linux_raid_member', 'a Linux RAID (md) member', `md magic at byte ${at}`);
  }
  if (u32(head, 1024) === 0xf2f52010) add('f2fs', 'an F2FS file system', 'magic at byte 1024');
  if (ascii(head, 0, 'hsqs')) add('squashfs', 'a squashfs image', '"hsqs" at byte 0');
  if (ascii(head, 32769, 'CD001')) add('iso9660', 'an ISO 9660 image', '"CD001" at byte 32769');
  for (const at of [512, 4096]) {
    if (ascii(head, at, 'EFI PART')) add('gpt', 'a GPT partition table', `"EFI PART" at byte ${at}`);
  }
  if (head.length >= 512 && head[510] === 0x55 && head[511] === 0xaa) {
    add('dos', 'an MBR (DOS) partition table or boot sector', 'signature 0x55AA at byte 510');
  }
  return found;
}

/**
 * A bcache superblock at byte 4096, or undefined. One with bcache's magic but
 * a version bcache never had (bcachefs uses the same magic) is returned as a
 * foreign signature instead, never as something --wipe-bcache may overwrite.
 */
export function bcacheSignature(head: Buffer): BcacheSignature | Signature | undefined {
  if (head.length < SB_OFFSET + 2258 || !hasBcacheMagic(head.subarray(SB_OFFSET))) return undefined;
  const f = readSuperblockFields(head.subarray(SB_OFFSET, SB_OFFSET + 4096));
  const v = f.version <= BigInt(BCACHE_SB_MAX_VERSION) ? Number(f.version) : -1;
  if (v < 0 || v === 2) {
    return {
      type: 'bcache-like',
      description: `a superblock with bcache's magic but version ${f.version} (bcachefs?)`,
      where: "bcache's magic at byte 4120",
    };
  }
  return {
    version: v,
    kind: v === 1 || v === 4 || v === 6 ? 'backing device' : 'cache device',
    uuid: formatUuid(f.uuid),
    setUuid: formatUuid(f.setUuid),
  };
}

export function isBcacheSignature(s: BcacheSignature | Signature): s is BcacheSignature {
  return 'version' in s;
}

export interface BlkidResult {
  /** false when blkid is not installed (or could not run). */
  ran: boolean;
  /** Everything blkid found other than bcache. */
  signatures: Signature[];
}

/**
 * Ask `blkid -p` (low-level probe of superblocks and partition tables, no
 * cache). Exit status 2 means nothing found; 8 means several conflicting
 * signatures, which is a reason to refuse on its own.
 */
export function blkidProbe(path: string): BlkidResult {
  const r = spawnSync('blkid', ['-p', '-o', 'export', path], { encoding: 'utf8' });
  if (r.error) return { ran: false, signatures: [] };
  if (r.status === 2) return { ran: true, signatures: [] };
  if (r.status === 8) {
    return {
      ran: true,
      signatures: [{ type: 'ambivalent', description: 'several conflicting signatures', where: 'blkid -p' }],
    };
  }
  if (r.status !== 0) return { ran: false, signatures: [] };
  const vars = new Map<string, string>();
  for (const line of r.stdout.split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) vars.set(line.slice(0, eq), line.slice(eq + 1));
  }
  const signatures: Signature[] = [];
  const type = vars.get('TYPE');
  if (type !== undefined && type !== 'bcache') {
    signatures.push({ type, description: `${type} (${vars.get('USAGE') ?? 'signature'})`, where: 'found by blkid -p' });
  }
  const pt = vars.get('PTTYPE');
  if (pt !== undefined)
    signatures.push({ type: pt, description: `a ${pt} partition table`, where: 'found by blkid -p' });
  return { ran: true, signatures };
}
