// `ubcache ctl`: bcache's sysfs tree of a running `ubcache serve`, used as
// people use sysfs: cat, write (echo >), ls, tree; plus status and stats.

import { controlRequest, errorText, type ControlResponse } from '../control/client.ts';
import { defaultControlPath } from '../control/paths.ts';
import { errorMessage } from '../util/lifecycle.ts';
import { CliError, parseCommandArgs, type Subcommand } from './common.ts';

const HELP = `Usage: ubcache ctl [--control PATH] COMMAND [ARGS]

Read and write bcache's sysfs attributes of a running ubcache serve. Paths
are the kernel's; the leading /sys may be omitted.

Commands:
  cat PATH           print an attribute, e.g. cat block/bcache0/bcache/state
  write PATH VALUE   write an attribute (echo VALUE > PATH), e.g.
                     write /sys/block/bcache0/bcache/cache_mode writeback
                     write /sys/fs/bcache/register /dev/sdb
  ls [PATH]          list a directory (default /sys/fs/bcache)
  tree [PATH]        every attribute below PATH (default /sys) with its value
  status             cache sets and bcache devices: state, mode, dirty data, hit ratio
  stats              hit and miss counters of every device and set

Options:
  --control PATH     the control socket (default $XDG_RUNTIME_DIR/ubcache/control.sock,
                     else /run/ubcache/control.sock)
  -h, --help         show this help
`;

/** The tree's JSON view: values, null for write-only files, directories, and links as {"$link": target}. */
interface JsonObject {
  [k: string]: Json;
}
type Json = string | null | JsonObject;

/** "block/bcache0" -> "/sys/block/bcache0". */
export function sysPath(path: string): string {
  const parts = path.split('/').filter((p) => p !== '');
  if (parts[0] === 'sys') parts.shift();
  return `/sys/${parts.map(encodeURIComponent).join('/')}`.replace(/\/$/, '') || '/sys';
}

async function call(socket: string, method: string, path: string, body?: string): Promise<ControlResponse> {
  let r: ControlResponse;
  try {
    r = await controlRequest(socket, method, path, body);
  } catch (err) {
    throw new CliError(`cannot reach the control socket ${socket}: ${errorMessage(err)}`, {
      hint: 'Is ubcache serve running? Pass its --control PATH if it was started with one.',
    });
  }
  if (r.status >= 400) throw new CliError(errorText(r));
  return r;
}

async function json(socket: string, path: string): Promise<Json> {
  const r = await call(socket, 'GET', `/json${path}`);
  return JSON.parse(r.body) as Json;
}

function isDir(j: Json | undefined): j is JsonObject {
  return typeof j === 'object' && j !== null && typeof j['$link'] !== 'string';
}

function printTree(j: Json, prefix: string, out: string[]): void {
  if (!isDir(j)) return;
  for (const [name, v] of Object.entries(j)) {
    const path = `${prefix}/${name}`;
    if (v === null) continue;
    if (typeof v === 'string')
      out.push(v.includes('\n') ? `${path}:\n  ${v.split('\n').join('\n  ')}` : `${path}: ${v}`);
    else if (isDir(v)) printTree(v, path, out);
    else out.push(`${path} -> ${String(v['$link'])}`);
  }
}

function field(dir: Json | undefined, ...names: string[]): string {
  let j = dir;
  for (const n of names) j = isDir(j) ? j[n] : undefined;
  return typeof j === 'string' ? j : '-';
}

/** The selected option of a bracketed choice list. */
function selected(list: string): string {
  return /\[([^\]]+)\]/.exec(list)?.[1] ?? list;
}

function table(rows: string[][]): string {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  return (
    rows
      .map((r) =>
        r
          .map((c, i) => c.padEnd(widths[i] ?? 0))
          .join('  ')
          .trimEnd(),
      )
      .join('\n') + '\n'
  );
}

function sets(root: Json): Array<[string, Json]> {
  const fs = isDir(root) && isDir(root['fs']) ? root['fs']['bcache'] : undefined;
  return isDir(fs) ? Object.entries(fs).filter(([, v]) => isDir(v)) : [];
}

function devices(root: Json): Array<[string, Json]> {
  const block = isDir(root) ? root['block'] : undefined;
  return isDir(block)
    ? Object.entries(block).map(([n, v]) => [n, isDir(v) ? v['bcache'] : undefined] as [string, Json])
    : [];
}

function status(root: Json): string {
  const out: string[] = [];
  const s = sets(root);
  out.push(
    s.length === 0
      ? 'no cache set\n'
      : table([
          ['SET', 'AVAILABLE', 'DIRTY', 'HIT%', 'BUCKET', 'BLOCK'],
          ...s.map(([uuid, d]) => [
            uuid,
            `${field(d, 'cache_available_percent')}%`,
            field(d, 'dirty_data'),
            field(d, 'stats_total', 'cache_hit_ratio'),
            field(d, 'bucket_size'),
            field(d, 'block_size'),
          ]),
        ]),
  );
  const d = devices(root);
  out.push(
    d.length === 0
      ? 'no bcache device\n'
      : table([
          ['DEVICE', 'RUNNING', 'STATE', 'MODE', 'DIRTY', 'HIT%', 'BACKING'],
          ...d.map(([name, b]) => [
            name,
            field(b, 'running') === '1' ? 'yes' : 'no',
            field(b, 'state'),
            selected(field(b, 'cache_mode')),
            field(b, 'dirty_data'),
            field(b, 'stats_total', 'cache_hit_ratio'),
            field(b, 'backing_dev_name'),
          ]),
        ]),
  );
  return out.join('\n');
}

function stats(root: Json): string {
  const rows = [
    ['OBJECT', 'PERIOD', 'HITS', 'MISSES', 'HIT%', 'BYPASS_HITS', 'BYPASS_MISSES', 'COLLISIONS', 'BYPASSED'],
  ];
  const objects: Array<[string, Json]> = [
    ...devices(root),
    ...sets(root).map(([u, v]) => [`set ${u}`, v] as [string, Json]),
  ];
  for (const [name, dir] of objects) {
    for (const period of ['total', 'five_minute', 'hour', 'day']) {
      const f = (n: string): string => field(dir, `stats_${period}`, n);
      rows.push([
        name,
        period,
        f('cache_hits'),
        f('cache_misses'),
        f('cache_hit_ratio'),
        f('cache_bypass_hits'),
        f('cache_bypass_misses'),
        f('cache_miss_collisions'),
        f('bypassed'),
      ]);
    }
  }
  return rows.length === 1 ? 'nothing registered\n' : table(rows);
}

export const run: Subcommand = async (args) => {
  const parsed = parseCommandArgs(
    args,
    { control: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
    "Run 'ubcache ctl --help' for the commands.",
  );
  if (parsed.values.help === true) {
    process.stdout.write(HELP);
    return 0;
  }
  const socket = parsed.values.control ?? defaultControlPath();
  const [cmd, ...rest] = parsed.positionals;
  const need = (n: number, usage: string): void => {
    if (rest.length !== n) throw new CliError(`usage: ubcache ctl ${usage}`);
  };
  switch (cmd) {
    case 'cat': {
      need(1, 'cat PATH');
      process.stdout.write((await call(socket, 'GET', sysPath(rest[0] ?? ''))).body);
      return 0;
    }
    case 'write': {
      need(2, 'write PATH VALUE');
      await call(socket, 'PUT', sysPath(rest[0] ?? ''), rest[1] ?? '');
      return 0;
    }
    case 'ls': {
      if (rest.length > 1) throw new CliError('usage: ubcache ctl ls [PATH]');
      const path = sysPath(rest[0] ?? '/sys/fs/bcache');
      const j = await json(socket, path);
      process.stdout.write(
        isDir(j)
          ? Object.keys(j)
              .map((n) => `${n}\n`)
              .join('')
          : `${path}\n`,
      );
      return 0;
    }
    case 'tree': {
      if (rest.length > 1) throw new CliError('usage: ubcache ctl tree [PATH]');
      const path = sysPath(rest[0] ?? '/sys');
      const out: string[] = [];
      printTree(await json(socket, path), path === '/sys' ? '/sys' : path, out);
      process.stdout.write(out.map((l) => `${l}\n`).join(''));
      return 0;
    }
    case 'status':
      need(0, 'status');
      process.stdout.write(status(await json(socket, '/sys')));
      return 0;
    case 'stats':
      need(0, 'stats');
      process.stdout.write(stats(await json(socket, '/sys')));
      return 0;
    case undefined:
      throw new CliError('no command given', { hint: "Run 'ubcache ctl --help' for the commands." });
    default:
      throw new CliError(`unknown command '${cmd}'`, { hint: 'The commands are cat, write, ls, tree, status, stats.' });
  }
};
