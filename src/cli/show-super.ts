// `ubcache show-super [-f] [--json] DEV`: print a device's bcache superblock.
//
// The text output is bcache-super-show's (bcache-tools 1.0.8) byte for byte,
// with the same exit codes, so scripts written against it keep working:
// 0 printed (also for a superblock version it does not know, after printing
// the version line), 1 bad usage, 2 cannot open or read / bad magic / bad
// sector / bad checksum (unless -f), 3 an "experimental" version 4 backing
// superblock. Its messages on stderr are kept too; a line of advice follows.
// --json prints the same facts as one JSON object for scripts.

import { closeSync, openSync, readSync, constants } from 'node:fs';
import { parseArgs } from 'node:util';
import {
  BDEV_DATA_START_DEFAULT,
  BCACHE_SB_VERSION_BDEV,
  BCACHE_SB_VERSION_BDEV_WITH_OFFSET,
  BCACHE_SB_VERSION_CDEV,
  BCACHE_SB_VERSION_CDEV_WITH_UUID,
  SB_OFFSET,
  SB_SECTOR,
  SB_SIZE,
} from '../format/constants.ts';
import {
  bdevCacheMode,
  bdevState,
  cacheDiscard,
  cacheReplacement,
  cacheSync,
  hasBcacheMagic,
  readSuperblockFields,
  superblockCsum,
  type SuperblockFields,
} from '../format/superblock.ts';
import { formatUuid } from '../format/uuid-text.ts';
import { NbdBlockDevice } from '../blockdev/nbd.ts';
import { isRemote, remoteError, strerror } from './device-file.ts';
import type { Subcommand } from './common.ts';
import { processOutput, type Output } from './output.ts';

/** sizeof(struct cache_sb) in bcache-tools 1.0.8: what it reads, and needs, at byte 4096. */
const TOOLS_SB_BYTES = 2256;
const U64 = 2n ** 64n;

const USAGE = 'Usage: ubcache show-super [-f|--force-csum] [--json] <device>';
const HELP = `${USAGE}

Print the bcache superblock of a device or image file, as bcache-super-show does.

  -f, --force-csum   print everything even if the checksum does not match
      --json         print the same facts as a JSON object
  -h, --help         show this help
`;

const REPLACEMENT = ['lru', 'fifo', 'random'];
const CACHE_MODES = ['writethrough', 'writeback', 'writearound', 'no caching'];
const STATES = ['detached', 'clean', 'dirty', 'inconsistent'];

/** bcache-super-show's print_encode(): label bytes it accepts raw, others as printf("%%%x", (signed char)c). */
function encodeLabel(label: Buffer): string {
  let out = '';
  for (const c of label) {
    if (c === 0) break;
    const ch = String.fromCharCode(c);
    if (/[0-9A-Za-z._-]/.test(ch)) out += ch;
    else out += `%${(c >= 0x80 ? (c - 256) >>> 0 : c).toString(16)}`;
  }
  return out;
}

function labelText(label: Buffer): string {
  const end = label.indexOf(0);
  return label.subarray(0, end < 0 ? label.length : end).toString('utf8');
}

/** A u64 for JSON: a number when exact, else its decimal string. */
function jsonU64(v: bigint): number | string {
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v.toString();
}

interface Report {
  lines: string[];
  json: Record<string, unknown>;
  /** bcache-super-show's stderr message and our advice, when it stops early. */
  error?: { message: string; advice: string };
  status: number;
}

/** What bcache-super-show prints for this superblock block (at least 2256 bytes). */
export function describeSuperblock(block: Buffer, path: string, forceCsum: boolean): Report {
  const f: SuperblockFields = readSuperblockFields(
    block.length >= 2258 ? block : Buffer.concat([block, Buffer.alloc(2)]),
  );
  const lines: string[] = [];
  const sb: Record<string, unknown> = {};
  const json: Record<string, unknown> = { device: path, sb };
  const stop = (status: number, message: string, advice: string): Report => ({
    lines,
    json: { ...json, error: message },
    error: { message, advice },
    status,
  });

  if (!hasBcacheMagic(block)) {
    lines.push('sb.magic\t\tbad magic');
    sb['magic'] = 'bad magic';
    return stop(2, 'Invalid superblock (bad magic)', `${path} has no bcache superblock at byte ${SB_OFFSET}.`);
  }
  lines.push('sb.magic\t\tok');
  sb['magic'] = 'ok';

  sb['first_sector'] = jsonU64(f.offset);
  if (f.offset !== BigInt(SB_SECTOR)) {
    lines.push(`sb.first_sector\t\t${f.offset} [expected ${SB_SECTOR}s]`);
    return stop(
      2,
      'Invalid superblock (bad sector)',
      `the superblock says it is at sector ${f.offset}, not 8: it is damaged.`,
    );
  }
  lines.push(`sb.first_sector\t\t${f.offset} [match]`);

  const expected = superblockCsum(block, f.keys);
  const csumHex = f.csum.toString(16).toUpperCase();
  sb['csum'] = csumHex;
  sb['csum_expected'] = expected.toString(16).toUpperCase();
  sb['csum_ok'] = f.csum === expected;
  if (f.csum === expected) {
    lines.push(`sb.csum\t\t\t${csumHex} [match]`);
  } else {
    lines.push(`sb.csum\t\t\t${csumHex} [expected ${expected.toString(16).toUpperCase()}]`);
    if (!forceCsum) {
      return stop(2, 'Corrupt superblock (bad csum)', 'the superblock is damaged; -f shows it anyway.');
    }
  }

  const version = f.version;
  sb['version'] = jsonU64(version);
  const v = version <= 0xffffn ? Number(version) : -1;
  const isCache = v === BCACHE_SB_VERSION_CDEV || v === BCACHE_SB_VERSION_CDEV_WITH_UUID;
  const isBacking = v === BCACHE_SB_VERSION_BDEV || v === BCACHE_SB_VERSION_BDEV_WITH_OFFSET;
  const kind = isCache ? 'cache device' : isBacking ? 'backing device' : 'unknown';
  sb['kind'] = kind;
  lines.push(`sb.version\t\t${version} [${kind}]`);
  if (!isCache && !isBacking) return { lines, json, status: 0 };
  lines.push('');

  const dev: Record<string, unknown> = {};
  json['dev'] = dev;
  const label = encodeLabel(f.label);
  lines.push(`dev.label\t\t${label === '' ? '(empty)' : label}`);
  dev['label'] = labelText(f.label);
  const uuid = formatUuid(f.uuid);
  lines.push(`dev.uuid\t\t${uuid}`);
  dev['uuid'] = uuid;
  lines.push(`dev.sectors_per_block\t${f.blockSize}`);
  lines.push(`dev.sectors_per_bucket\t${f.bucketSize}`);
  dev['sectors_per_block'] = f.blockSize;
  dev['sectors_per_bucket'] = f.bucketSize;

  if (isCache) {
    // The tool's C arithmetic: u16 * u16 printed %u, u16 * u64 printed %ju (wrapping).
    const firstSector = (f.bucketSize * f.firstBucket) >>> 0;
    const cacheSectors = (BigInt(f.bucketSize) * ((f.nbuckets - BigInt(f.firstBucket) + U64) % U64)) % U64;
    const totalSectors = (BigInt(f.bucketSize) * f.nbuckets) % U64;
    const replacement = cacheReplacement(f);
    const name = REPLACEMENT[replacement];
    lines.push(`dev.cache.first_sector\t${firstSector}`);
    lines.push(`dev.cache.cache_sectors\t${cacheSectors}`);
    lines.push(`dev.cache.total_sectors\t${totalSectors}`);
    lines.push(`dev.cache.ordered\t${cacheSync(f) ? 'yes' : 'no'}`);
    lines.push(`dev.cache.discard\t${cacheDiscard(f) ? 'yes' : 'no'}`);
    lines.push(`dev.cache.pos\t\t${f.nrThisDev}`);
    lines.push(`dev.cache.replacement\t${replacement}${name ? ` [${name}]` : ''}`);
    dev['cache'] = {
      first_sector: firstSector,
      cache_sectors: jsonU64(cacheSectors),
      total_sectors: jsonU64(totalSectors),
      nbuckets: jsonU64(f.nbuckets),
      first_bucket: f.firstBucket,
      ordered: cacheSync(f),
      discard: cacheDiscard(f),
      pos: f.nrThisDev,
      replacement,
      replacement_name: name ?? null,
    };
  } else {
    let firstSector: bigint;
    if (v === BCACHE_SB_VERSION_BDEV) {
      firstSector = BigInt(BDEV_DATA_START_DEFAULT);
    } else {
      if (f.keys === 1 || (f.d[0] ?? 0n) !== 0n) {
        return stop(
          3,
          'Possible experimental format detected, bailing',
          'this version 4 backing superblock has journal fields set, which bcache-super-show takes for an old experimental format.',
        );
      }
      firstSector = f.nbuckets;
    }
    const mode = bdevCacheMode(f);
    const state = bdevState(f);
    const modeName = CACHE_MODES[mode];
    const stateName = STATES[state];
    lines.push(`dev.data.first_sector\t${firstSector}`);
    lines.push(`dev.data.cache_mode\t${mode}${modeName ? ` [${modeName}]` : ''}`);
    lines.push(`dev.data.cache_state\t${state}${stateName ? ` [${stateName}]` : ''}`);
    dev['data'] = {
      first_sector: jsonU64(firstSector),
      cache_mode: mode,
      cache_mode_name: modeName ?? null,
      cache_state: state,
      cache_state_name: stateName ?? null,
    };
  }
  lines.push('');
  const setUuid = formatUuid(f.setUuid);
  lines.push(`cset.uuid\t\t${setUuid}`);
  json['cset'] = { uuid: setUuid };
  return { lines, json, status: 0 };
}

export const run: Subcommand = (args) => showSuperAsync(args);

interface Request {
  path: string;
  json: boolean;
  force: boolean;
}

/** The arguments, or the exit status when there is nothing more to do (help, bad usage). */
function parseShowSuperArgs(args: string[], output: Output): Request | number {
  const out = (text: string): void => {
    output.stdout.write(text);
  };
  const err = (text: string): void => {
    output.stderr.write(text);
  };
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        'force-csum': { type: 'boolean', short: 'f' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
      allowPositionals: true,
      strict: true,
    });
  } catch (e) {
    err(`ubcache show-super: ${e instanceof Error ? e.message : String(e)}\n${USAGE}\n`);
    return 1;
  }
  if (parsed.values.help) {
    out(HELP);
    return 0;
  }
  const [path, ...extra] = parsed.positionals;
  if (path === undefined || extra.length > 0) {
    err(`${USAGE}\n`);
    return 1;
  }
  return { path, json: parsed.values.json === true, force: parsed.values['force-csum'] === true };
}

/** bcache-super-show's answer when the device cannot be opened: on stdout, status 2. */
function cannotOpen(req: Request, output: Output, reason: string): number {
  const message = `Can't open dev ${req.path}: ${reason}`;
  if (req.json) output.stdout.write(`${JSON.stringify({ device: req.path, error: message }, null, 2)}\n`);
  else output.stdout.write(`${message}\n`);
  return 2;
}

/** Print what `block` (the bytes read at SB_OFFSET, fewer if the device is short) holds; returns the exit status. */
function print(req: Request, block: Buffer, output: Output): number {
  const { path, json } = req;
  const out = (text: string): void => {
    output.stdout.write(text);
  };
  const err = (text: string): void => {
    output.stderr.write(text);
  };
  if (block.length < TOOLS_SB_BYTES) {
    if (json) out(`${JSON.stringify({ device: path, error: "Couldn't read" }, null, 2)}\n`);
    err(`Couldn't read\nubcache show-super: ${path} is too short to hold a bcache superblock (or cannot be read).\n`);
    return 2;
  }
  const report = describeSuperblock(block, path, req.force);
  if (json) out(`${JSON.stringify(report.json, null, 2)}\n`);
  else out(report.lines.map((l) => `${l}\n`).join(''));
  if (report.error) err(`${report.error.message}\nubcache show-super: ${report.error.advice}\n`);
  return report.status;
}

/**
 * The command, writing to `output`; returns the exit status. Files and block
 * devices only: for a remote export (an NBD URI) use showSuperAsync(), which
 * is what the command runs.
 */
export function showSuper(args: string[], output: Output = processOutput): number {
  const req = parseShowSuperArgs(args, output);
  if (typeof req === 'number') return req;
  const { path } = req;
  if (isRemote(path)) return cannotOpen(req, output, 'a remote export needs showSuperAsync()');
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY);
  } catch (e) {
    return cannotOpen(req, output, strerror(e));
  }
  let block: Buffer;
  try {
    block = Buffer.alloc(SB_SIZE);
    let done = 0;
    try {
      while (done < SB_SIZE) {
        const n = readSync(fd, block, done, SB_SIZE - done, SB_OFFSET + done);
        if (n === 0) break;
        done += n;
      }
    } catch {
      done = 0;
    }
    block = block.subarray(0, done);
  } finally {
    closeSync(fd);
  }
  return print(req, block, output);
}

/** showSuper() for any device, remote NBD exports (nbd://, nbd+unix://) too. */
export async function showSuperAsync(args: string[], output: Output = processOutput): Promise<number> {
  const req = parseShowSuperArgs(args, output);
  if (typeof req === 'number') return req;
  if (!isRemote(req.path)) return showSuper(args, output);
  let dev: NbdBlockDevice;
  try {
    dev = await NbdBlockDevice.open(req.path, { readOnly: true, connections: 1 });
  } catch (e) {
    return cannotOpen(req, output, remoteError(req.path, e));
  }
  // As for a file: whatever the device holds of the block; a failed read counts as nothing read.
  let block = Buffer.alloc(Math.max(0, Math.min(SB_SIZE, dev.size - SB_OFFSET)));
  try {
    if (block.length > 0) await dev.read(block, SB_OFFSET);
  } catch {
    block = Buffer.alloc(0);
  } finally {
    await dev.close().catch(() => undefined);
  }
  return print(req, block, output);
}
