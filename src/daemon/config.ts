// `serve --config FILE`: the devices to register at start and the bcache
// attributes to give them, kept in a file, the way bcache users keep
// cache_mode, sequential_cutoff and writeback_percent in udev rules.
//
// The format is INI as git-config and systemd units write it, parsed
// strictly here (no dependency): values are plain text, exactly what one
// would echo into the sysfs file, so `sequential_cutoff = 0` and
// `cache_mode = writeback` need no quoting and mean what sysfs means. (TOML
// would type them, and bcache's values are text.)
//
//   # comment (also ;), on a line of its own: a value runs to the line's end
//   [serve]                       serve's own options, by their long names
//   listen = 127.0.0.1:10809      (listen and socket repeat)
//   [cache "/path/cache.img"]     a cache device: registered at start; its
//   journal_delay_ms = 100        attributes are its cache set's
//   [backing "/dev/sdb"]          a backing device: registered at start
//   cache_mode = writeback
//   [backing "UUID"]              the backing device with that uuid, whenever
//   cache_mode = writearound      it registers (at start or at run time)
//   [set "UUID"] or [set]         that cache set, or every one
//
// Everything is checked when the file is read, before any device is opened:
// unknown sections and keys, bad values (each attribute's own parser, as a
// sysfs write), repeated sections and keys. Every error names the file and
// the line, and says what to write instead.

import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import {
  AttributeError,
  DEVICE_ATTRIBUTES,
  findAttribute,
  SET_ATTRIBUTES,
  type Attribute,
} from '../bcache/attributes.ts';
import type { CachedDev } from '../bcache/cached-dev.ts';
import type { RegisteredSet } from '../bcache/registry.ts';
import { formatUuid, parseUuid } from '../format/uuid-text.ts';
import { errorMessage } from '../util/lifecycle.ts';

export class ConfigError extends Error {}

/** What a section configures. */
export type ConfigTarget =
  | { kind: 'cache'; path: string }
  | { kind: 'backing'; path: string }
  | { kind: 'backing-uuid'; uuid: string }
  | { kind: 'set'; uuid: string }
  | { kind: 'sets' };

export interface ConfigSetting {
  /** "FILE:LINE", for messages. */
  where: string;
  attribute: string;
  value: string;
  apply: ((dev: CachedDev) => Promise<void>) | ((set: RegisteredSet) => Promise<void>);
}

export interface ConfigSection {
  where: string;
  target: ConfigTarget;
  settings: ConfigSetting[];
}

export interface ServeConfig {
  path: string;
  /** [serve] as command-line arguments (--listen=..., --read-only), in file order. */
  serveArgs: string[];
  /** Where each of serveArgs came from, for messages. */
  serveWhere: string[];
  sections: ConfigSection[];
}

/** A [serve] key: its option's kind, and whether it may repeat. */
const SERVE_KEYS: Record<string, { kind: 'string' | 'boolean'; repeat?: true }> = {
  listen: { kind: 'string', repeat: true },
  socket: { kind: 'string', repeat: true },
  control: { kind: 'string' },
  metrics: { kind: 'string' },
  'read-only': { kind: 'boolean' },
  'exit-when-idle': { kind: 'boolean' },
  'exit-with-parent': { kind: 'boolean' },
  pidfile: { kind: 'string' },
  verbose: { kind: 'boolean' },
  'shutdown-timeout': { kind: 'string' },
  'stop-timeout': { kind: 'string' },
  tls: { kind: 'string' },
  'tls-certificates': { kind: 'string' },
  'tls-psk': { kind: 'string' },
  'tls-verify-peer': { kind: 'boolean' },
};

const TRUE = new Set(['yes', 'true', 'on', '1']);
const FALSE = new Set(['no', 'false', 'off', '0']);

/** Read and check FILE. Throws ConfigError ("FILE:LINE: what is wrong; what to write"). */
export function loadServeConfig(path: string): ServeConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read the config file ${path}: ${errorMessage(err)}`);
  }
  return parseServeConfig(text, path);
}

/** Parse the text of a config file (`path` only names it in messages and resolves relative device paths). */
export function parseServeConfig(text: string, path: string): ServeConfig {
  const config: ServeConfig = { path, serveArgs: [], serveWhere: [], sections: [] };
  const base = resolve(path, '..');
  let section: ConfigSection | 'serve' | undefined;
  const seenSections = new Map<string, string>();
  let seenKeys = new Map<string, string>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const where = `${path}:${i + 1}`;
    const line = (lines[i] ?? '').replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    if (line.startsWith('[')) {
      const m = /^\[\s*([a-z]+)\s*(?:"((?:[^"\\]|\\.)*)")?\s*\]$/.exec(line);
      const name = m?.[1];
      if (m === null || name === undefined) {
        fail(
          where,
          `'${line}' is not a section header; write [serve], [cache "PATH"], [backing "PATH or UUID"] or [set "UUID"]`,
        );
      }
      const arg = m[2]?.replace(/\\(.)/g, '$1');
      const target = sectionTarget(name, arg, base, where);
      const key = target === 'serve' ? 'serve' : JSON.stringify(target);
      const before = seenSections.get(key);
      if (before !== undefined) fail(where, `section ${line} repeats the one at ${before}; write its settings there`);
      seenSections.set(key, where);
      seenKeys = new Map();
      if (target === 'serve') {
        section = 'serve';
      } else {
        section = { where, target, settings: [] };
        config.sections.push(section);
      }
      continue;
    }
    const eq = line.indexOf('=');
    if (eq < 0) fail(where, `'${line}' is not KEY = VALUE`);
    const key = line.slice(0, eq).trim();
    const value = line.slice(eq + 1).trim();
    if (!/^[a-z0-9_-]+$/.test(key)) fail(where, `'${key}' is not a key (lower-case letters, digits, _ and -)`);
    if (section === undefined)
      fail(where, `${key} comes before any section; start with [serve], [cache "PATH"] or [backing "PATH"]`);
    if (value === '') fail(where, `${key} has no value; write ${key} = VALUE, or leave the line out`);
    const earlier = seenKeys.get(key);
    if (section === 'serve') {
      const spec = SERVE_KEYS[key];
      if (spec === undefined) {
        fail(where, `[serve] has no key '${key}'; valid: ${Object.keys(SERVE_KEYS).join(', ')}`);
      }
      if (earlier !== undefined && spec.repeat !== true) fail(where, `${key} is already set at ${earlier}`);
      seenKeys.set(key, where);
      if (spec.kind === 'boolean') {
        const v = value.toLowerCase();
        if (!TRUE.has(v) && !FALSE.has(v)) fail(where, `${key} = ${value}: write yes or no`);
        if (TRUE.has(v)) {
          config.serveArgs.push(`--${key}`);
          config.serveWhere.push(where);
        }
      } else {
        config.serveArgs.push(`--${key}=${value}`);
        config.serveWhere.push(where);
      }
      continue;
    }
    if (earlier !== undefined) fail(where, `${key} is already set at ${earlier}`);
    seenKeys.set(key, where);
    const backing = section.target.kind === 'backing' || section.target.kind === 'backing-uuid';
    const list: ReadonlyArray<Attribute<CachedDev>> | ReadonlyArray<Attribute<RegisteredSet>> = backing
      ? DEVICE_ATTRIBUTES
      : SET_ATTRIBUTES;
    try {
      const attr = findAttribute<CachedDev | RegisteredSet>(
        list as ReadonlyArray<Attribute<CachedDev | RegisteredSet>>,
        key,
        backing ? 'a backing device' : 'a cache set',
      );
      section.settings.push({ where, attribute: key, value, apply: attr.parse(value) });
    } catch (err) {
      if (err instanceof AttributeError) fail(where, err.message);
      throw err;
    }
  }
  return config;
}

function sectionTarget(name: string, arg: string | undefined, base: string, where: string): ConfigTarget | 'serve' {
  switch (name) {
    case 'serve':
      if (arg !== undefined) fail(where, '[serve] takes no name');
      return 'serve';
    case 'cache':
    case 'backing': {
      if (arg === undefined || arg === '') {
        return fail(
          where,
          `[${name}] needs the device: [${name} "PATH"]${name === 'backing' ? ' or [backing "UUID"]' : ''}`,
        );
      }
      const uuid = parseUuid(arg);
      if (uuid) {
        if (name === 'cache') return fail(where, `[cache "${arg}"]: for a cache set by uuid write [set "${arg}"]`);
        return { kind: 'backing-uuid', uuid: formatUuid(uuid) };
      }
      return { kind: name, path: devicePath(arg, base) };
    }
    case 'set': {
      if (arg === undefined) return { kind: 'sets' };
      const uuid = parseUuid(arg);
      if (!uuid) return fail(where, `[set "${arg}"]: not a cache set uuid; write [set "UUID"], or [set] for every set`);
      return { kind: 'set', uuid: formatUuid(uuid) };
    }
    default:
      return fail(
        where,
        `unknown section [${name}]; valid: [serve], [cache "PATH"], [backing "PATH or UUID"], [set "UUID"]`,
      );
  }
}

function fail(where: string, why: string): never {
  throw new ConfigError(`${where}: ${why}`);
}

/** A device path relative to the config file's directory; an NBD URI as it is. */
function devicePath(arg: string, base: string): string {
  return /^[a-z+]+:\/\//.test(arg) ? arg : resolve(base, arg);
}
