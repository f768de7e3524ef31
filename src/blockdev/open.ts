// One place that turns a device spec from the command line or a config into a
// BlockDevice. Today a spec is a path (optionally written `file:PATH`); later
// kinds (fault-injection wrappers, remote nbd:// exports) plug in here by
// prefix, so every subcommand accepts all of them alike.

import { FileBlockDevice } from './file.ts';
import type { BlockDevice } from './types.ts';

export interface OpenDeviceOptions {
  readOnly?: boolean;
  /** Claim the device so nothing else may use it (O_EXCL on block devices). */
  exclusive?: boolean;
}

/** Open the device `spec` names. Errors say what is wrong with the spec or the device. */
export async function openBlockDevice(spec: string, options: OpenDeviceOptions = {}): Promise<BlockDevice> {
  const path = spec.startsWith('file:') ? spec.slice('file:'.length) : spec;
  if (path === '') throw new Error(`device spec "${spec}" names no path; give a file or block device path`);
  return FileBlockDevice.open(path, options);
}
