// A device named on the command line, opened for the one-shot tools (make,
// show-super): a regular file or a block device, with its size and block
// sizes, or a remote NBD export named by its URI. Files use synchronous I/O
// (these tools do one thing and exit); a remote export cannot, so it has the
// *Async functions, which take files too, and the tools use those when a URI
// is among their devices.

import { closeSync, fstatSync, openSync, readFileSync, readSync, writeSync, fsyncSync, constants } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { NbdBlockDevice } from '../blockdev/nbd.ts';
import { describeTransport, isNbdUri, parseNbdUri } from '../nbd/uri.ts';
import { errorMessage } from '../util/lifecycle.ts';
import { CliError } from './common.ts';

export interface DeviceFile {
  path: string;
  /** -1 for a remote export. */
  fd: number;
  kind: 'file' | 'block' | 'nbd';
  /** The connection to a remote export (kind 'nbd'). */
  remote?: NbdBlockDevice;
  /** Size in bytes. */
  size: number;
  /** Logical block size in bytes (512 for regular files). */
  logicalBlockSize: number;
  /** stat's st_blksize: the preferred I/O size make-bcache takes as a file's block size. */
  preferredBlockSize: number;
  /** Identity, to notice the same device named twice. */
  identity: string;
}

/** glibc's strerror() wording for the errors a path can give (Node's messages differ). */
const STRERROR: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  ENXIO: 'No such device or address',
  ENODEV: 'No such device',
  EBUSY: 'Device or resource busy',
  EROFS: 'Read-only file system',
  EIO: 'Input/output error',
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  ENOMEDIUM: 'No medium found',
  ETXTBSY: 'Text file busy',
  EINVAL: 'Invalid argument',
  ENOSPC: 'No space left on device',
  EMFILE: 'Too many open files',
};

export function errnoCode(err: unknown): string | undefined {
  if (err && typeof err === 'object' && 'code' in err && typeof err.code === 'string') return err.code;
  return undefined;
}

/** The C library's message for a Node fs error, as C tools print it. */
export function strerror(err: unknown): string {
  const code = errnoCode(err);
  if (code && STRERROR[code]) return STRERROR[code];
  const msg = err instanceof Error ? err.message : String(err);
  // Node: "ENOENT: no such file or directory, open 'x'"; keep the middle, capitalised.
  const m = /^[A-Z0-9_]+: ([^,]+)/.exec(msg);
  const text = m?.[1] ?? msg;
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** major() and minor() of a Linux dev_t. */
function devMajor(rdev: number): number {
  return Number(((BigInt(rdev) >> 8n) & 0xfffn) | ((BigInt(rdev) >> 32n) & ~0xfffn));
}
function devMinor(rdev: number): number {
  return Number((BigInt(rdev) & 0xffn) | ((BigInt(rdev) >> 12n) & ~0xffn));
}

function readSysNumber(path: string): number | undefined {
  try {
    const v = Number(readFileSync(path, 'utf8').trim());
    return Number.isSafeInteger(v) ? v : undefined;
  } catch {
    return undefined;
  }
}

/** Size and logical block size of a block device: sysfs, else blockdev(8). */
function blockDeviceGeometry(path: string, rdev: number): { size: number; logicalBlockSize: number } {
  const sys = `/sys/dev/block/${devMajor(rdev)}:${devMinor(rdev)}`;
  const sectors = readSysNumber(`${sys}/size`);
  // Partitions have no queue/ of their own: it is their disk's.
  const lbs = readSysNumber(`${sys}/queue/logical_block_size`) ?? readSysNumber(`${sys}/../queue/logical_block_size`);
  if (sectors !== undefined && lbs !== undefined) return { size: sectors * 512, logicalBlockSize: lbs };
  const r = spawnSync('blockdev', ['--getsize64', '--getss', path], { encoding: 'utf8' });
  const [size, ss] = r.status === 0 ? r.stdout.trim().split(/\s+/).map(Number) : [];
  if (size === undefined || ss === undefined || !Number.isSafeInteger(size) || !Number.isSafeInteger(ss)) {
    throw new CliError(`${path}: cannot find the size of this block device`, {
      hint: 'Neither /sys/dev/block nor blockdev(8) answered; is sysfs mounted?',
    });
  }
  return { size, logicalBlockSize: ss };
}

export interface OpenOptions {
  write: boolean;
}

/**
 * Open a regular file or block device. Block devices opened for writing are
 * opened O_EXCL, which Linux refuses (EBUSY) while the device is mounted,
 * registered with bcache or otherwise claimed: then nothing is written.
 */
export function openDevice(path: string, options: OpenOptions): DeviceFile {
  let fd: number;
  try {
    fd = openSync(path, options.write ? constants.O_RDWR : constants.O_RDONLY);
  } catch (err) {
    throw new CliError(`cannot open ${path}: ${strerror(err)}`, { hint: hintFor(err, path) });
  }
  try {
    const st = fstatSync(fd);
    if (st.isBlockDevice()) {
      if (options.write) {
        // Reopen exclusively now that we know it is a block device (O_EXCL means
        // something else, or nothing, for other files).
        closeSync(fd);
        fd = -1;
        try {
          fd = openSync(path, constants.O_RDWR | constants.O_EXCL);
        } catch (err) {
          throw new CliError(`cannot open ${path} exclusively: ${strerror(err)}`, {
            hint:
              errnoCode(err) === 'EBUSY'
                ? `${path} is in use (mounted, registered with bcache, part of another device, or open elsewhere); stop whatever uses it first.`
                : hintFor(err, path),
          });
        }
      }
      const g = blockDeviceGeometry(path, st.rdev);
      return {
        path,
        fd,
        kind: 'block',
        size: g.size,
        logicalBlockSize: g.logicalBlockSize,
        preferredBlockSize: st.blksize,
        identity: `block:${st.rdev}`,
      };
    }
    if (st.isFile()) {
      return {
        path,
        fd,
        kind: 'file',
        size: st.size,
        logicalBlockSize: 512,
        preferredBlockSize: st.blksize,
        identity: `file:${st.dev}:${st.ino}`,
      };
    }
    throw new CliError(`${path} is neither a regular file nor a block device`, {
      hint: 'Name a disk, a partition, a loop device or an image file.',
    });
  } catch (err) {
    if (fd >= 0) closeSync(fd);
    throw err;
  }
}

function hintFor(err: unknown, path: string): string {
  switch (errnoCode(err) ?? '') {
    case 'ENOENT':
      return `Check the path; to use an image file, create it first (e.g. truncate -s 1G ${path}).`;
    case 'EACCES':
    case 'EPERM':
      return 'Run as a user allowed to write the device (usually root).';
    case 'EISDIR':
      return 'Name a device or an image file, not a directory.';
    case 'EROFS':
      return 'The device or file system is read-only.';
    default:
      return `Check that ${path} is a device or image file you can read and write.`;
  }
}

/** A remote device's error without the URI it starts with (the caller names the device already). */
export function remoteError(path: string, err: unknown): string {
  const message = errorMessage(err);
  return message.startsWith(`${path}: `) ? message.slice(path.length + 2) : message;
}

/** Is `path` a remote export (an NBD URI) rather than a file? */
export function isRemote(path: string): boolean {
  return isNbdUri(path);
}

/**
 * Open a file, a block device or a remote NBD export. Files go through
 * openDevice(); an export is connected (one connection: these tools do a few
 * small I/Os) and described like a file: its size, the server's minimum
 * block size as the logical block size, its preferred block size (or 4 KiB).
 */
export async function openDeviceAsync(path: string, options: OpenOptions): Promise<DeviceFile> {
  if (!isRemote(path)) return openDevice(path, options);
  let remote: NbdBlockDevice;
  let identity: string;
  try {
    const uri = parseNbdUri(path);
    identity = `nbd:${describeTransport(uri.transport)}/${uri.exportName}`;
    remote = await NbdBlockDevice.open(uri, { connections: 1, ...(options.write ? {} : { readOnly: true }) });
  } catch (err) {
    throw new CliError(`cannot open ${path}: ${remoteError(path, err)}`, {
      hint: 'Check that the NBD server is running and serves that export (nbdinfo URI shows what it serves).',
    });
  }
  if (options.write && remote.readOnly) {
    await remote.close().catch(() => undefined);
    throw new CliError(`cannot open ${path}: the NBD server exports it read-only`, {
      hint: 'Serve the export writable (e.g. without -r / --read-only).',
    });
  }
  return {
    path,
    fd: -1,
    kind: 'nbd',
    remote,
    size: remote.size,
    logicalBlockSize: remote.logicalBlockSize,
    preferredBlockSize: remote.client.info.advertisedBlockSize?.preferred ?? 4096,
    identity,
  };
}

/** readAt() for any device; the result is shorter at the end of the device. */
export async function readAtAsync(dev: DeviceFile, length: number, position: number): Promise<Buffer> {
  if (!dev.remote) return readAt(dev, length, position);
  const n = Math.max(0, Math.min(length, dev.size - position));
  const buf = Buffer.alloc(n);
  if (n > 0) await dev.remote.read(buf, position);
  return buf;
}

export async function writeAtAsync(dev: DeviceFile, buf: Buffer, position: number): Promise<void> {
  if (dev.remote) await dev.remote.write(buf, position);
  else writeAt(dev, buf, position);
}

export async function syncDeviceAsync(dev: DeviceFile): Promise<void> {
  if (dev.remote) await dev.remote.flush();
  else syncDevice(dev);
}

export async function closeDeviceAsync(dev: DeviceFile): Promise<void> {
  if (dev.remote) await dev.remote.close();
  else closeDevice(dev);
}

function syncOnly(dev: DeviceFile): void {
  if (dev.kind === 'nbd') throw new Error(`${dev.path}: a remote export needs the asynchronous device functions`);
}

/** Read up to `length` bytes at `position`; the result is shorter at the end of the device. */
export function readAt(dev: DeviceFile, length: number, position: number): Buffer {
  syncOnly(dev);
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const n = readSync(dev.fd, buf, done, length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return buf.subarray(0, done);
}

export function writeAt(dev: DeviceFile, buf: Buffer, position: number): void {
  syncOnly(dev);
  let done = 0;
  while (done < buf.length) {
    done += writeSync(dev.fd, buf, done, buf.length - done, position + done);
  }
}

export function syncDevice(dev: DeviceFile): void {
  syncOnly(dev);
  fsyncSync(dev.fd);
}

export function closeDevice(dev: DeviceFile): void {
  syncOnly(dev);
  closeSync(dev.fd);
}
