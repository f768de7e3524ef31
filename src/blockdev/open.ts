// One place that turns a device spec from the command line or a config into a
// BlockDevice, so every subcommand accepts every kind alike.
//
//   PATH | file:PATH       a regular file or a block device
//   nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH
//                          a remote NBD export (nbds:// and nbds+unix://
//                          parse, but TLS is refused at connect for now)
//   faulty:RULES@SPEC      SPEC with failures injected (rule syntax: faulty.ts)
//
// A relative path that happens to start with "faulty:" or "file:" can be
// written ./faulty:... .

import { FaultyBlockDevice, parseFaultSpec } from './faulty.ts';
import { FileBlockDevice } from './file.ts';
import { isNbdUri } from '../nbd/uri.ts';
import { NbdBlockDevice } from './nbd.ts';
import type { BlockDevice } from './types.ts';

export interface OpenDeviceOptions {
  readOnly?: boolean;
  /** Claim the device so nothing else may use it (O_EXCL on block devices; NBD has no such claim). */
  exclusive?: boolean;
}

/** Open the device `spec` names. Errors say what is wrong with the spec or the device. */
export async function openBlockDevice(spec: string, options: OpenDeviceOptions = {}): Promise<BlockDevice> {
  if (spec.startsWith('faulty:')) {
    const body = spec.slice('faulty:'.length);
    const at = body.indexOf('@');
    if (at < 0) throw new Error(`device spec "${spec}": a faulty device is written faulty:RULES@DEVICE`);
    // Parse before opening, so a typo in the rules does not leave a device open.
    const rules = parseFaultSpec(body.slice(0, at));
    const inner = await openBlockDevice(body.slice(at + 1), options);
    return new FaultyBlockDevice(inner, { rules });
  }
  if (isNbdUri(spec)) return NbdBlockDevice.open(spec, options.readOnly === true ? { readOnly: true } : {});
  const path = spec.startsWith('file:') ? spec.slice('file:'.length) : spec;
  if (path === '') throw new Error(`device spec "${spec}" names no path; give a file or block device path`);
  return FileBlockDevice.open(path, options);
}
