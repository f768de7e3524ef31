// `ubcache ctl show [-m] [-d DEV]`: bcache-tools' `bcache show`. Without -d,
// a row per registered device (backing devices, then the cache devices of
// the registered sets) with bcache-tools' columns and words: Type is the
// superblock version and (data) or (cache); State is the backing device's
// sysfs state with "(running)" appended while it has a bcacheN, or "active"
// for a cache device of a registered set; Bname the bcacheN ("Non-Exist"
// before it runs, "N/A" for a cache); AttachToDev the cache device of the
// set a backing device is attached to ("Alone" if none). -m adds the uuids.
// -d prints the device's superblock as `bcache show -d` does (what
// bcache-super-show prints, without its "[match]" notes); it reads the
// device itself, so it works on an unregistered device, or with no daemon,
// given a path.
//
// bcache-tools separates the columns with tabs; ctl pads them with spaces
// (paths of image files are longer than /dev/sdb): the cells are the same.

import { SB_SIZE } from '../../format/constants.ts';
import { describeSuperblock } from '../show-super.ts';
import { CliError } from '../common.ts';
import type { Control } from './connection.ts';
import { findDevice, isUuid } from './devices.ts';
import { readSuperblockBlock, superblockIdentity } from './superblock.ts';
import { table } from './table.ts';
import { registered, type Registered } from './tree-json.ts';

async function typeCell(
  path: string,
  fallback: 'data' | 'cache',
): Promise<{ type: string; uuid?: string; set?: string }> {
  const sb = await superblockIdentity(path);
  if (!sb) return { type: `? (${fallback})` };
  return { type: `${sb.version} (${sb.kind})`, uuid: sb.uuid, set: sb.setUuid };
}

export async function showDevices(reg: Registered, more: boolean): Promise<string> {
  const rows = [
    more
      ? ['Name', 'Uuid', 'Cset_Uuid', 'Type', 'State', 'Bname', 'AttachToDev', 'AttachToCset']
      : ['Name', 'Type', 'State', 'Bname', 'AttachToDev'],
  ];
  const cacheOf = (uuid: string | undefined): string =>
    uuid === undefined ? 'Alone' : (reg.sets.find((s) => s.uuid === uuid)?.cachePath ?? uuid);
  for (const d of reg.devices) {
    const t = await typeCell(d.path, 'data');
    const state = `${d.state}${d.running ? '(running)' : ''}`;
    const bname = d.running ? d.name : 'Non-Exist';
    rows.push(
      more
        ? [
            d.path,
            d.uuid,
            t.set ?? d.attachedTo ?? '-',
            t.type,
            state,
            bname,
            cacheOf(d.attachedTo),
            d.attachedTo ?? 'Non-Exist',
          ]
        : [d.path, t.type, state, bname, cacheOf(d.attachedTo)],
    );
  }
  for (const s of reg.sets) {
    const t = await typeCell(s.cachePath, 'cache');
    rows.push(
      more
        ? [s.cachePath, t.uuid ?? '-', s.uuid, t.type, 'active', 'N/A', 'N/A', 'N/A']
        : [s.cachePath, t.type, 'active', 'N/A', 'N/A'],
    );
  }
  return table(rows);
}

/** `show -d DEV`: bcacheN and uuids are looked up in the daemon; a path is read directly. */
export async function showDetail(ctl: Control, spec: string): Promise<string> {
  let path = spec;
  if (/^(\/dev\/)?bcache\d+$/.test(spec) || isUuid(spec)) {
    const t = await findDevice(registered(await ctl.json()), spec);
    path = t.kind === 'backing' ? t.dev.path : t.set.cachePath;
  }
  const block = await readSuperblockBlock(path);
  if (block.length < SB_SIZE) throw new CliError(`${path}: too short to hold a bcache superblock`);
  const report = describeSuperblock(block, path, false);
  if (report.error) throw new CliError(`${path}: ${report.error.message}`, { hint: report.error.advice });
  return report.lines.map((l) => `${l.replace(/ \[match\]$/, '')}\n`).join('');
}
