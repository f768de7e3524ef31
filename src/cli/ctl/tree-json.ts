// The attribute tree's JSON view (GET /json/sys) as ctl reads it: values,
// null for write-only files, directories, and links as {"$link": target};
// and the registered devices, flash-only volumes and cache sets found in it.

export interface JsonObject {
  [k: string]: Json;
}
export type Json = string | null | JsonObject;

export function isDir(j: Json | undefined): j is JsonObject {
  return typeof j === 'object' && j !== null && typeof j['$link'] !== 'string';
}

/** The target of a link, or undefined. */
export function linkTarget(j: Json | undefined): string | undefined {
  return typeof j === 'object' && j !== null && typeof j['$link'] === 'string' ? j['$link'] : undefined;
}

/** The value at dir/names..., or undefined. */
export function value(dir: Json | undefined, ...names: string[]): string | undefined {
  let j = dir;
  for (const n of names) j = isDir(j) ? j[n] : undefined;
  return typeof j === 'string' ? j : undefined;
}

/** value(), or '-' for a table cell. */
export function field(dir: Json | undefined, ...names: string[]): string {
  return value(dir, ...names) ?? '-';
}

/** The selected option of a bracketed choice list ("writethrough [writeback] ..." -> "writeback"). */
export function selected(list: string): string {
  return /\[([^\]]+)\]/.exec(list)?.[1] ?? list;
}

const UNITS = '?kMGTPEZY';

/** Bytes from bch_hprint's text ("12.5M"); approximate, as the text is. NaN if it is not such a text. */
export function parseHprint(text: string): number {
  const m = /^(-?)(\d+)\.(\d)([kMGTPEZY])$/.exec(text.trim());
  if (!m) return NaN;
  const bytes = (Number(m[2]) + Number(m[3]) / 10) * 1024 ** UNITS.indexOf(m[4] ?? '?');
  return m[1] === '-' ? -bytes : bytes;
}

/** A backing device (/sys/block/bcacheN/bcache). */
export interface BackingDevice {
  /** bcacheN */
  name: string;
  dir: JsonObject;
  /** The device as registered (backing_dev_path), or its base name from a daemon without that file. */
  path: string;
  uuid: string;
  running: boolean;
  state: string;
  /** The cache set it is attached to. */
  attachedTo: string | undefined;
}

/** A registered cache set (/sys/fs/bcache/UUID) and its cache device. */
export interface CacheSetEntry {
  uuid: string;
  dir: JsonObject;
  cachePath: string;
}

/** A flash-only volume: /sys/block/bcacheN/bcache, linked as volumeSLOT from its set's directory. */
export interface FlashVolumeEntry {
  /** bcacheN */
  name: string;
  dir: JsonObject;
  set: string;
  slot: number;
}

export interface Registered {
  /** Backing devices (a volume's bcacheN is not one). */
  devices: BackingDevice[];
  volumes: FlashVolumeEntry[];
  sets: CacheSetEntry[];
}

/** The bcacheN of a /sys/block/bcacheN/bcache link target. */
function blockName(target: string | undefined): string | undefined {
  return /^\/sys\/block\/([^/]+)\/bcache$/.exec(target ?? '')?.[1];
}

/** The devices and sets in the whole tree's JSON (GET /json/sys). */
export function registered(root: Json): Registered {
  const block = isDir(root) ? root['block'] : undefined;
  const fsBcache = isDir(root) && isDir(root['fs']) ? root['fs']['bcache'] : undefined;
  // Volumes first: their directories are told from backing devices' by the sets' volumeN links.
  const volumes: FlashVolumeEntry[] = [];
  if (isDir(fsBcache) && isDir(block)) {
    for (const [set, setDir] of Object.entries(fsBcache)) {
      if (!isDir(setDir)) continue;
      for (const [entry, j] of Object.entries(setDir)) {
        const slot = /^volume(\d+)$/.exec(entry)?.[1];
        const name = blockName(linkTarget(j));
        const blockDir = name === undefined ? undefined : block[name];
        const dir = isDir(blockDir) ? blockDir['bcache'] : undefined;
        if (slot === undefined || name === undefined || !isDir(dir)) continue;
        volumes.push({ name, dir, set, slot: Number(slot) });
      }
    }
  }
  volumes.sort((a, b) => a.name.localeCompare(b.name, 'en', { numeric: true }));
  const isVolume = new Set(volumes.map((v) => v.name));
  const devices: BackingDevice[] = [];
  if (isDir(block)) {
    for (const [name, blockDir] of Object.entries(block)) {
      const dir = isDir(blockDir) ? blockDir['bcache'] : undefined;
      if (!isDir(dir) || isVolume.has(name)) continue;
      const cache = linkTarget(dir['cache']);
      devices.push({
        name,
        dir,
        path: value(dir, 'backing_dev_path') ?? value(dir, 'backing_dev_name') ?? name,
        uuid: value(dir, 'backing_dev_uuid') ?? '',
        running: value(dir, 'running') === '1',
        state: value(dir, 'state') ?? '',
        attachedTo: cache?.split('/').pop(),
      });
    }
  }
  const sets: CacheSetEntry[] = [];
  if (isDir(fsBcache)) {
    for (const [uuid, dir] of Object.entries(fsBcache)) {
      if (!isDir(dir)) continue;
      sets.push({ uuid, dir, cachePath: value(dir, 'cache0', 'dev_path') ?? `cache0 of ${uuid}` });
    }
  }
  return { devices, volumes, sets };
}
