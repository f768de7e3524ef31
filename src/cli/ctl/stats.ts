// `ubcache ctl stats [--total|--day|--hour|--five-minute] [--json] [--watch SECONDS]`:
// the hit and miss counters of every bcache device and cache set, from
// bcache's stats_total/, stats_day/, stats_hour/ and stats_five_minute/
// (all four unless one is chosen). --json prints one object
// {"devices": {NAME: {PERIOD: {FILE: VALUE}}}, "sets": {UUID: ...}} with
// the counters as numbers and bypassed as bcache prints it. --watch redraws
// every SECONDS (on a terminal the screen, as watch(1) does; otherwise a new
// table, or one JSON object a line, each time) until ^C, and fails as soon
// as the daemon is gone.

import type { TextStream } from '../output.ts';
import { CliError } from '../common.ts';
import { DaemonUnreachable, type Control } from './connection.ts';
import { table } from './table.ts';
import type { Period } from './periods.ts';
import { field, registered, type Json } from './tree-json.ts';
import { watchLoop } from './watch.ts';

const FILES = [
  'cache_hits',
  'cache_misses',
  'cache_hit_ratio',
  'cache_bypass_hits',
  'cache_bypass_misses',
  'cache_miss_collisions',
  'bypassed',
] as const;

function objects(root: Json): Array<{ kind: 'devices' | 'sets'; name: string; dir: Json }> {
  const { devices, sets } = registered(root);
  return [
    ...devices.map((d) => ({ kind: 'devices' as const, name: d.name, dir: d.dir })),
    ...sets.map((s) => ({ kind: 'sets' as const, name: s.uuid, dir: s.dir })),
  ];
}

export function statsTable(root: Json, periods: readonly Period[]): string {
  const rows = [
    ['OBJECT', 'PERIOD', 'HITS', 'MISSES', 'HIT%', 'BYPASS_HITS', 'BYPASS_MISSES', 'COLLISIONS', 'BYPASSED'],
  ];
  for (const o of objects(root)) {
    const name = o.kind === 'sets' ? `set ${o.name}` : o.name;
    for (const period of periods) {
      const f = (n: string): string => field(o.dir, `stats_${period}`, n);
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

type StatsJson = Record<'devices' | 'sets', Record<string, Partial<Record<Period, Record<string, number | string>>>>>;

export function statsJson(root: Json, periods: readonly Period[]): StatsJson {
  const out: StatsJson = { devices: {}, sets: {} };
  for (const o of objects(root)) {
    const entry: Partial<Record<Period, Record<string, number | string>>> = {};
    for (const period of periods) {
      const values: Record<string, number | string> = {};
      for (const f of FILES) {
        const v = field(o.dir, `stats_${period}`, f);
        values[f] = /^\d+$/.test(v) ? Number(v) : v;
      }
      entry[period] = values;
    }
    out[o.kind][o.name] = entry;
  }
  return out;
}

export interface StatsOptions {
  periods: readonly Period[];
  json: boolean;
  /** Redraw every this many seconds. */
  watchSeconds?: number;
}

export async function stats(ctl: Control, o: StatsOptions, out: TextStream): Promise<void> {
  const render = async (): Promise<string> => {
    const root = await ctl.json();
    return o.json ? `${JSON.stringify(statsJson(root, o.periods))}\n` : statsTable(root, o.periods);
  };
  const seconds = o.watchSeconds;
  if (seconds === undefined) {
    out.write(await render());
    return;
  }
  try {
    await watchLoop(seconds * 1000, async () => {
      const body = await render();
      if (o.json) {
        out.write(body);
      } else {
        const header = `Every ${seconds}s: ubcache ctl stats    ${new Date().toISOString()}\n\n`;
        // On a terminal: home, clear, draw (watch(1)); elsewhere one table after another.
        out.write(out.isTTY === true ? `\x1b[H\x1b[2J${header}${body}` : `${header}${body}\n`);
      }
    });
  } catch (err) {
    if (err instanceof DaemonUnreachable) {
      throw new CliError(`the daemon has gone away: ${err.message}`, { hint: 'The live view ends with it.' });
    }
    throw err;
  }
}
