// What the server exports: a named BlockDevice with its NBD-visible
// properties. The transmission flags are derived here, once, from the
// device's capabilities and the export's settings, so that we never advertise
// a feature the device cannot deliver and INFO and GO always agree.

import type { BlockDevice } from '../blockdev/types.ts';
import type { BlockSizes } from './codec.ts';
import { ExportMetrics } from './metrics.ts';
import { DEFAULT_MAX_PAYLOAD, MAX_STRING_BYTES, TxFlag } from './protocol.ts';

export interface ExportConfig {
  name: string;
  description?: string;
  device: BlockDevice;
  /** Serve the device read-only even if it is writable. */
  readOnly?: boolean;
  /**
   * Block size constraints (NBD_INFO_BLOCK_SIZE). Defaults: min 1 (a file
   * device handles any alignment), preferred 4096, max 32 MiB.
   */
  blockSize?: Partial<BlockSizes>;
}

export interface Export {
  readonly name: string;
  readonly description: string;
  readonly device: BlockDevice;
  readonly readOnly: boolean;
  readonly blockSize: BlockSizes;
  readonly size: number;
  /** The 16-bit transmission flags advertised for this export. */
  readonly flags: number;
  /** Requests served, by command (for /metrics). */
  readonly metrics: ExportMetrics;
}

const isPowerOfTwo = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

/** Validate a config and derive what the handshake advertises. Throws with a message naming the export. */
export function resolveExport(config: ExportConfig): Export {
  const what = `export '${config.name}'`;
  if (Buffer.byteLength(config.name) > MAX_STRING_BYTES) {
    throw new Error(`${what}: the name is longer than ${MAX_STRING_BYTES} bytes; choose a shorter name`);
  }
  if (config.name.includes('\0')) throw new Error(`${what}: the name contains a NUL character; choose another name`);
  const description = config.description ?? '';
  if (Buffer.byteLength(description) > MAX_STRING_BYTES) {
    throw new Error(`${what}: the description is longer than ${MAX_STRING_BYTES} bytes; shorten it`);
  }
  const min = config.blockSize?.min ?? 1;
  const preferred = config.blockSize?.preferred ?? Math.max(4096, min);
  const max = config.blockSize?.max ?? DEFAULT_MAX_PAYLOAD;
  // The spec's rules for NBD_INFO_BLOCK_SIZE (proto.md, "Block size constraints").
  if (!isPowerOfTwo(min) || min > 65536) {
    throw new Error(`${what}: minimum block size ${min} must be a power of two no larger than 65536`);
  }
  if (!isPowerOfTwo(preferred) || preferred < Math.max(min, 512)) {
    throw new Error(`${what}: preferred block size ${preferred} must be a power of two of at least max(min, 512)`);
  }
  if (!Number.isInteger(max) || max < preferred || max % min !== 0 || max > 0xffffffff) {
    throw new Error(
      `${what}: maximum block size ${max} must be a multiple of the minimum, at least the preferred size and below 2^32`,
    );
  }
  const device = config.device;
  if (device.size % min !== 0) {
    throw new Error(`${what}: the device size ${device.size} is not a multiple of the minimum block size ${min}`);
  }
  const readOnly = (config.readOnly ?? false) || device.readOnly;
  return {
    name: config.name,
    description,
    device,
    readOnly,
    blockSize: { min, preferred, max },
    size: device.size,
    flags: transmissionFlags(device, readOnly),
    metrics: new ExportMetrics(),
  };
}

/**
 * FLUSH and FUA are always offered (without SEND_FLUSH the Linux client
 * assumes no volatile cache and never flushes). MULTI_CONN is safe because
 * every connection shares the one device, whose flush covers every write
 * completed before it, whichever connection sent it.
 */
export function transmissionFlags(device: BlockDevice, readOnly: boolean): number {
  let flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.CAN_MULTI_CONN | TxFlag.SEND_CACHE;
  if (device.caps.rotational) flags |= TxFlag.ROTATIONAL;
  if (readOnly) {
    flags |= TxFlag.READ_ONLY;
  } else {
    flags |= TxFlag.SEND_WRITE_ZEROES;
    if (device.caps.discard) flags |= TxFlag.SEND_TRIM;
    if (device.caps.fastZero) flags |= TxFlag.SEND_FAST_ZERO;
  }
  return flags;
}
