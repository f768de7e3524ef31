// `ubcache make`: format cache and backing devices, as make-bcache does.
//
// Same options, spellings, defaults and output as make-bcache (bcache-tools
// 1.0.8), and the same result on disk, so the Linux kernel and
// bcache-super-show accept what it writes. Better where make-bcache is
// broken: every argument and every device is checked before anything is
// written; an invalid replacement policy, a size the kernel would refuse, a
// cache too small for the kernel, the same device named twice or as two
// caches of one set, and any existing signature are refused with the reason;
// --wipe-bcache really does let a bcache superblock be overwritten.
//
// What is written (see docs/on-disk-format.md, "What make writes"): zeroes
// over the first 4 KiB (stale partition tables and file system signatures
// go), the superblock block at 4 KiB, and, on a cache, zeroes over the
// journal buckets the kernel will use, so no stale journal entry of an
// earlier cache with the same set UUID can ever be replayed.

import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import {
  BDEV_DATA_START_DEFAULT,
  CACHE_REPLACEMENT_NAMES,
  defaultFirstBucket,
  isPowerOfTwo,
  journalBucketCount,
  MIN_CACHE_BUCKETS,
  PAGE_SECTORS,
  SB_OFFSET,
  SECTOR_SIZE,
} from '../format/constants.ts';
import { encodeSuperblock, newBackingSuperblock, newCacheSuperblock, type Superblock } from '../format/superblock.ts';
import { formatUuid, isZeroUuid, parseUuid } from '../format/uuid-text.ts';
import { CliError, type Subcommand } from './common.ts';
import {
  closeDevice,
  closeDeviceAsync,
  isRemote,
  openDevice,
  openDeviceAsync,
  readAt,
  readAtAsync,
  syncDevice,
  syncDeviceAsync,
  writeAt,
  writeAtAsync,
  type DeviceFile,
} from './device-file.ts';
import {
  bcacheSignature,
  blkidProbe,
  findSignatures,
  isBcacheSignature,
  PROBE_BYTES,
  type Signature,
} from './make-signatures.ts';
import { processOutput, type Output } from './output.ts';
import { Progress } from './progress.ts';

const USAGE = `Usage: ubcache make [options] device...
	-C, --cache		Format a cache device
	-B, --bdev		Format a backing device
	-b, --bucket		bucket size
	-w, --block		block size (hard sector size of SSD, often 2k)
	-o, --data-offset	data offset in sectors
	    --cset-uuid		UUID for the cache set
	    --writeback		enable writeback
	    --discard		enable discards
	    --cache_replacement_policy=(lru|fifo|random)
	    --wipe-bcache	overwrite an existing bcache superblock
	-h, --help		display this help and exit
`;

const HELP = `${USAGE}
Each device is formatted as a cache (-C) or backing device (-B) according to
the last -C or -B before it; all devices of one command share one cache set
UUID, so the backing devices attach to the cache when registered.

Sizes are bytes with an optional k, m, g or t suffix (powers of 1024).
Defaults: bucket 512k; block the largest logical block size of the devices
(4k for image files); data offset 16 sectors (8k).

A device that already holds a file system, swap, a partition table or any
other signature is refused: erase it first (wipefs -a DEVICE) if you are sure.
`;

/** make-bcache's default bucket: 1024 sectors (512 KiB). */
const DEFAULT_BUCKET_SECTORS = 1024;
/** Largest power of two that fits the superblock's 16-bit sector fields. */
const MAX_SIZE_SECTORS = 32768;
const ZERO_CHUNK = 1024 * 1024;

type Role = 'cache' | 'backing';

interface Options {
  devices: Array<{ path: string; role: Role }>;
  bucketSectors: number | undefined;
  blockSectors: number | undefined;
  dataOffset: number;
  setUuid: Buffer;
  writeback: boolean;
  discard: boolean;
  replacement: number;
  wipeBcache: boolean;
}

/** "64k" -> 65536: bytes with an optional binary suffix, as make-bcache's hatoi() reads them. */
export function parseSize(text: string): number | undefined {
  const m = /^(\d+)([kmgt])?(i?b)?$/i.exec(text.trim());
  if (!m?.[1]) return undefined;
  const shift = { '': 0, k: 10, m: 20, g: 30, t: 40 }[(m[2] ?? '').toLowerCase()] ?? 0;
  const v = Number(m[1]) * 2 ** shift;
  return Number.isSafeInteger(v) ? v : undefined;
}

export function formatBytes(bytes: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes} bytes` : `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[i]}`;
}

/** A size option (-b, -w) in sectors, checked as make-bcache's hatoi_validate() does, with clearer words. */
function sizeOption(name: string, flag: string, text: string): number {
  const bytes = parseSize(text);
  if (bytes === undefined) {
    throw new CliError(`${flag} ${text}: not a size`, {
      hint: `Give the ${name} in bytes, e.g. ${flag} 4k or ${flag} 512k.`,
    });
  }
  if (bytes < SECTOR_SIZE) {
    throw new CliError(`${flag} ${text}: the ${name} is ${bytes} bytes, smaller than a 512-byte sector`, {
      hint: `Sizes are in bytes: ${flag} ${text}k means ${text} KiB.`,
    });
  }
  if (!isPowerOfTwo(bytes)) {
    throw new CliError(`${flag} ${text}: the ${name} must be a power of two`, {
      hint: 'For example 512, 4k, 64k, 512k or 1m.',
    });
  }
  const sectors = bytes / SECTOR_SIZE;
  if (sectors > MAX_SIZE_SECTORS) {
    throw new CliError(`${flag} ${text}: the ${name} is too large; the superblock holds at most 16m`, {
      hint: `Choose ${flag} 16m or less.`,
    });
  }
  return sectors;
}

function parseOptions(args: string[]): Options | 'help' {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        cache: { type: 'boolean', short: 'C', multiple: true },
        bdev: { type: 'boolean', short: 'B', multiple: true },
        bucket: { type: 'string', short: 'b' },
        block: { type: 'string', short: 'w' },
        'data-offset': { type: 'string', short: 'o' },
        data_offset: { type: 'string' },
        'cset-uuid': { type: 'string' },
        writeback: { type: 'boolean' },
        discard: { type: 'boolean' },
        'cache-replacement-policy': { type: 'string' },
        cache_replacement_policy: { type: 'string' },
        'wipe-bcache': { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
      allowPositionals: true,
      strict: true,
      tokens: true,
    });
  } catch (err) {
    throw new CliError(err instanceof Error ? err.message : String(err), { hint: USAGE.trimEnd() });
  }
  const v = parsed.values;
  if (v.help) return 'help';

  // Devices take the role of the last -C/-B before them (make-bcache's getopt "-" order).
  const devices: Options['devices'] = [];
  let role: Role | undefined;
  for (const t of parsed.tokens) {
    if (t.kind === 'option' && t.name === 'cache') role = 'cache';
    else if (t.kind === 'option' && t.name === 'bdev') role = 'backing';
    else if (t.kind === 'positional') {
      if (!role) {
        throw new CliError(`${t.value}: say whether it is a cache or a backing device`, {
          hint: `Put -C (cache) or -B (backing) before it, e.g. ubcache make -C ${t.value}.`,
        });
      }
      devices.push({ path: t.value, role });
    }
  }
  if (devices.length === 0) throw new CliError('no device given', { hint: USAGE.trimEnd() });

  let dataOffset = BDEV_DATA_START_DEFAULT;
  const offsetText = v['data-offset'] ?? v.data_offset;
  if (offsetText !== undefined) {
    if (!/^\d+$/.test(offsetText.trim()) || !Number.isSafeInteger(Number(offsetText))) {
      throw new CliError(`--data-offset ${offsetText}: not a number of sectors`, {
        hint: 'For example -o 16 (the default, 8 KiB) or -o 2048 (1 MiB).',
      });
    }
    dataOffset = Number(offsetText);
    if (dataOffset < BDEV_DATA_START_DEFAULT) {
      throw new CliError(
        `--data-offset ${offsetText}: the data offset must be at least ${BDEV_DATA_START_DEFAULT} sectors`,
        {
          hint: 'The superblock ends at sector 16 (8 KiB); -o 16 is the default.',
        },
      );
    }
  }

  let setUuid: Buffer;
  const uuidText = v['cset-uuid'];
  if (uuidText !== undefined) {
    const u = parseUuid(uuidText);
    if (!u) {
      throw new CliError(`--cset-uuid ${uuidText}: not a UUID`, {
        hint: 'Write it as 8-4-4-4-12 hex digits, e.g. the output of uuidgen.',
      });
    }
    if (isZeroUuid(u))
      throw new CliError('--cset-uuid: the all-zero UUID is not allowed (the kernel refuses it)', {
        hint: 'Use uuidgen for a new one.',
      });
    setUuid = u;
  } else {
    setUuid = parseUuid(randomUUID()) ?? Buffer.alloc(16);
  }

  let replacement = 0;
  const policy = v['cache-replacement-policy'] ?? v.cache_replacement_policy;
  if (policy !== undefined) {
    replacement = CACHE_REPLACEMENT_NAMES.indexOf(policy.trim());
    if (replacement < 0) {
      throw new CliError(`--cache_replacement_policy ${policy}: unknown policy`, {
        hint: `Choose one of ${CACHE_REPLACEMENT_NAMES.join(', ')}.`,
      });
    }
  }

  return {
    devices,
    bucketSectors: v.bucket !== undefined ? sizeOption('bucket size', '-b', v.bucket) : undefined,
    blockSectors: v.block !== undefined ? sizeOption('block size', '-w', v.block) : undefined,
    dataOffset,
    setUuid,
    writeback: v.writeback === true,
    discard: v.discard === true,
    replacement,
    wipeBcache: v['wipe-bcache'] === true,
  };
}

interface Plan {
  dev: DeviceFile;
  role: Role;
  sb: Superblock;
  /** Byte ranges to zero before the superblock is written. */
  zero: Array<[number, number]>;
}

/**
 * blkid(8) on what is there: the device itself, or for a remote export (which
 * blkid cannot open) a copy of its first PROBE_BYTES in a temporary file.
 */
function blkidSignatures(dev: DeviceFile, head: Buffer): Signature[] {
  if (dev.kind !== 'nbd') return blkidProbe(dev.path).signatures;
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-probe-'));
  try {
    const copy = join(dir, 'head');
    writeFileSync(copy, head);
    return blkidProbe(copy).signatures;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Refuse the device if anything is on it (`head` is its start), unless it is bcache and --wipe-bcache was given. */
function checkSignatures(dev: DeviceFile, head: Buffer, wipeBcache: boolean): void {
  const own = bcacheSignature(head);
  const found: Signature[] = findSignatures(head);
  if (own && !isBcacheSignature(own)) found.unshift(own);
  for (const s of blkidSignatures(dev, head)) {
    if (!found.some((f) => f.type === s.type)) found.push(s);
  }
  const first = found[0];
  if (first) {
    const others =
      found.length > 1
        ? ` (and ${found
            .slice(1)
            .map((s) => s.type)
            .join(', ')})`
        : '';
    throw new CliError(
      `${dev.path} already holds ${first.description} (${first.where})${others}; ubcache make will not overwrite it`,
      {
        hint: `If its contents are no longer needed, erase the signatures first with: wipefs -a ${dev.path}`,
      },
    );
  }
  if (own && isBcacheSignature(own) && !wipeBcache) {
    throw new CliError(`${dev.path} is already a bcache ${own.kind} (UUID ${own.uuid}, set ${own.setUuid})`, {
      hint: 'Add --wipe-bcache to overwrite its superblock.',
    });
  }
}

function plan(options: Options, devs: DeviceFile[]): Plan[] {
  const hasCache = options.devices.some((d) => d.role === 'cache');
  // make-bcache's default block size: the largest logical block size of the
  // devices, taking st_blksize for image files (capped at a page: the kernel
  // refuses cache blocks larger than that).
  const block =
    options.blockSectors ??
    Math.max(
      ...devs.map((d) =>
        d.kind === 'block'
          ? d.logicalBlockSize / SECTOR_SIZE
          : Math.min(Math.max(d.preferredBlockSize / SECTOR_SIZE, 1), PAGE_SECTORS),
      ),
    );
  const bucket = options.bucketSectors ?? DEFAULT_BUCKET_SECTORS;
  if (bucket < block) {
    throw new CliError(
      `the bucket size (${formatBytes(bucket * SECTOR_SIZE)}) is smaller than the block size (${formatBytes(block * SECTOR_SIZE)})`,
      {
        hint: 'A bucket holds whole blocks: choose -b at least as large as -w.',
      },
    );
  }
  if (hasCache && block > PAGE_SECTORS) {
    throw new CliError(
      `a block size of ${formatBytes(block * SECTOR_SIZE)} is larger than a page (4k); the Linux kernel refuses such a cache`,
      {
        hint: 'Use -w 4k or smaller.',
      },
    );
  }
  if (hasCache && bucket < PAGE_SECTORS) {
    throw new CliError(
      `a bucket size of ${formatBytes(bucket * SECTOR_SIZE)} is smaller than a page (4k); the Linux kernel refuses such a cache`,
      {
        hint: 'Use -b 4k or larger (the default is 512k).',
      },
    );
  }
  const hasBacking = options.devices.some((d) => d.role === 'backing');
  if (hasBacking && options.dataOffset % block !== 0) {
    throw new CliError(
      `the data offset (${options.dataOffset} sectors) is not a multiple of the block size (${block} sectors)`,
      {
        hint: 'Every read and write of the backing device would be misaligned; choose a multiple, e.g. -o 2048.',
      },
    );
  }

  return options.devices.map(({ role }, i) => {
    const dev = devs[i];
    if (!dev) throw new Error('device list out of step');
    if (dev.logicalBlockSize > block * SECTOR_SIZE) {
      throw new CliError(
        `the block size (${formatBytes(block * SECTOR_SIZE)}) is smaller than ${dev.path}'s logical block size (${dev.logicalBlockSize})`,
        {
          hint: `The kernel refuses such a superblock; use -w ${dev.logicalBlockSize / 1024}k or leave -w out.`,
        },
      );
    }
    const sectors = Math.floor(dev.size / SECTOR_SIZE);
    const uuid = parseUuid(randomUUID()) ?? Buffer.alloc(16);
    if (role === 'cache') {
      const nbuckets = Math.floor(sectors / bucket);
      if (nbuckets < MIN_CACHE_BUCKETS) {
        throw new CliError(
          `${dev.path} (${formatBytes(dev.size)}) holds ${nbuckets} buckets of ${formatBytes(bucket * SECTOR_SIZE)}; the Linux kernel needs at least ${MIN_CACHE_BUCKETS}`,
          {
            hint: `With this bucket size a cache must be at least ${formatBytes(MIN_CACHE_BUCKETS * bucket * SECTOR_SIZE)}; use a larger device or a smaller bucket (-b).`,
          },
        );
      }
      const sb = newCacheSuperblock({
        uuid,
        setUuid: options.setUuid,
        blockSize: block,
        bucketSize: bucket,
        nbuckets,
        discard: options.discard,
        replacement: options.replacement,
      });
      const first = defaultFirstBucket(bucket) * bucket * SECTOR_SIZE;
      const journalEnd = first + journalBucketCount(nbuckets) * bucket * SECTOR_SIZE;
      return {
        dev,
        role,
        sb,
        zero: [
          [0, SB_OFFSET],
          [first, journalEnd],
        ],
      };
    }
    const minBytes = (options.dataOffset + block) * SECTOR_SIZE;
    if (dev.size < minBytes) {
      throw new CliError(
        `${dev.path} (${formatBytes(dev.size)}) has no room for data after the ${options.dataOffset}-sector data offset`,
        {
          hint: `A backing device must be larger than ${formatBytes(minBytes - block * SECTOR_SIZE)}.`,
        },
      );
    }
    const sb = newBackingSuperblock({
      uuid,
      setUuid: options.setUuid,
      blockSize: block,
      bucketSize: bucket,
      dataOffset: options.dataOffset,
      writeback: options.writeback,
    });
    return { dev, role, sb, zero: [[0, SB_OFFSET]] };
  });
}

/**
 * The writes that format one device, in order: zeroes over its ranges (with
 * progress on stderr), then the superblock last, so an interrupted make leaves
 * no superblock over a half-prepared device. The sync and async drivers
 * perform them.
 */
function* formatWrites(p: Plan, output: Output): Generator<[Buffer, number]> {
  const total = p.zero.reduce((n, [a, b]) => n + (b - a), 0);
  const progress = new Progress(`zeroing ${p.dev.path}`, total, { stream: output.stderr });
  const chunk = Buffer.alloc(ZERO_CHUNK);
  let done = 0;
  for (const [start, end] of p.zero) {
    for (let at = start; at < end; at += ZERO_CHUNK) {
      const len = Math.min(ZERO_CHUNK, end - at);
      yield [len === ZERO_CHUNK ? chunk : chunk.subarray(0, len), at];
      done += len;
      progress.update(done);
    }
  }
  progress.finish();
  yield [encodeSuperblock(p.sb), SB_OFFSET];
}

/** Caches first, then backing devices, as make-bcache does. */
function writeOrder(plans: Plan[]): Plan[] {
  return [...plans.filter((p) => p.role === 'cache'), ...plans.filter((p) => p.role === 'backing')];
}

function writeFailure(err: unknown, ordered: Plan[], p: Plan): CliError {
  if (err instanceof CliError) return err;
  const done = ordered.slice(0, ordered.indexOf(p)).map((q) => q.dev.path);
  return new CliError(`writing ${p.dev.path} failed: ${err instanceof Error ? err.message : String(err)}`, {
    hint: done.length > 0 ? `${done.join(', ')} were formatted before the failure.` : 'Nothing was formatted.',
  });
}

function sameDevice(devs: DeviceFile[], dev: DeviceFile): void {
  const twin = devs.find((o) => o !== dev && o.identity === dev.identity);
  if (twin) throw new CliError(`${dev.path} and ${twin.path} are the same device`, { hint: 'Name each device once.' });
}

/** Parse and check the arguments that need no device: the options, or 'help'. */
function prepare(args: string[]): Options | 'help' {
  const options = parseOptions(args);
  if (options === 'help') return options;
  const caches = options.devices.filter((d) => d.role === 'cache');
  if (caches.length > 1) {
    throw new CliError(
      `${caches.map((d) => d.path).join(' and ')} would be two caches of one set; a cache set holds one cache device`,
      {
        hint: 'Linux (since 5.10) refuses a second cache in a set: format each cache with its own command.',
      },
    );
  }
  return options;
}

function report(p: Plan): string {
  const { sb } = p;
  if (p.role === 'cache') {
    return (
      `UUID:\t\t\t${formatUuid(sb.uuid)}\nSet UUID:\t\t${formatUuid(sb.setUuid)}\nversion:\t\t${sb.version}\n` +
      `nbuckets:\t\t${sb.nbuckets}\nblock_size:\t\t${sb.blockSize}\nbucket_size:\t\t${sb.bucketSize}\n` +
      `nr_in_set:\t\t${sb.nrInSet}\nnr_this_dev:\t\t${sb.nrThisDev}\nfirst_bucket:\t\t${sb.firstBucket}\n`
    );
  }
  return (
    `UUID:\t\t\t${formatUuid(sb.uuid)}\nSet UUID:\t\t${formatUuid(sb.setUuid)}\nversion:\t\t${sb.version}\n` +
    `block_size:\t\t${sb.blockSize}\ndata_offset:\t\t${sb.dataOffset}\n`
  );
}

/**
 * The command, writing to `output`; returns the exit status. Errors are
 * thrown as CliError (main() prints them); nothing is written to any device
 * unless every argument and every device passed its checks. Files and block
 * devices only: with a remote export (an NBD URI) among the devices, use
 * makeAsync(), which is what the command runs.
 */
export function make(args: string[], output: Output = processOutput): number {
  const options = prepare(args);
  if (options === 'help') {
    output.stdout.write(HELP);
    return 0;
  }
  const remote = options.devices.find((d) => isRemote(d.path));
  if (remote) throw new Error(`make(): ${remote.path} is a remote export; use makeAsync()`);
  const devs: DeviceFile[] = [];
  try {
    for (const d of options.devices) {
      const dev = openDevice(d.path, { write: true });
      devs.push(dev);
      sameDevice(devs, dev);
    }
    for (const dev of devs) checkSignatures(dev, readAt(dev, Math.min(PROBE_BYTES, dev.size), 0), options.wipeBcache);
    const ordered = writeOrder(plan(options, devs));
    for (const p of ordered) {
      try {
        for (const [buf, at] of formatWrites(p, output)) writeAt(p.dev, buf, at);
        syncDevice(p.dev);
      } catch (err) {
        throw writeFailure(err, ordered, p);
      }
      output.stdout.write(report(p));
    }
    return 0;
  } finally {
    for (const d of devs) closeDevice(d);
  }
}

/**
 * make() for any devices, remote NBD exports (nbd://, nbd+unix://) among
 * them: the same checks, plan and writes, with the I/O awaited. Without a
 * remote device it is make() itself.
 */
export async function makeAsync(args: string[], output: Output = processOutput): Promise<number> {
  const options = prepare(args);
  if (options === 'help' || !options.devices.some((d) => isRemote(d.path))) return make(args, output);
  const devs: DeviceFile[] = [];
  try {
    for (const d of options.devices) {
      const dev = await openDeviceAsync(d.path, { write: true });
      devs.push(dev);
      sameDevice(devs, dev);
    }
    for (const dev of devs) {
      checkSignatures(dev, await readAtAsync(dev, Math.min(PROBE_BYTES, dev.size), 0), options.wipeBcache);
    }
    const ordered = writeOrder(plan(options, devs));
    for (const p of ordered) {
      try {
        for (const [buf, at] of formatWrites(p, output)) await writeAtAsync(p.dev, buf, at);
        await syncDeviceAsync(p.dev);
      } catch (err) {
        throw writeFailure(err, ordered, p);
      }
      output.stdout.write(report(p));
    }
    return 0;
  } finally {
    for (const d of devs) await closeDeviceAsync(d).catch(() => undefined);
  }
}

export const run: Subcommand = (args) => makeAsync(args);
