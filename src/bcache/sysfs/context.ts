// What the attribute tree's directories need from their owner: the registry,
// the decaying stats views, and a way to run operations that the kernel runs
// after the write returns (detach, stop, unregister) so that they are
// awaited at shutdown and their failures logged.

import type { Registry } from '../registry.ts';
import type { CacheAccounting } from '../stats.ts';
import type { AccountingViews } from './accounting.ts';
import { dir, ro, type SysfsDir } from './node.ts';
import { statsFiles } from '../stats.ts';

export interface TreeContext {
  readonly registry: Registry;
  readonly views: AccountingViews;
  /** Run an operation the write only starts; failures are logged. */
  background(what: string, op: () => Promise<void>): void;
}

/** stats_total/, stats_five_minute/, stats_hour/, stats_day/ of one accounting. */
export function statsDirs(ctx: TreeContext, acc: () => CacheAccounting): Array<readonly [string, SysfsDir]> {
  const view = (files: () => Record<string, string>): SysfsDir =>
    dir(() => Object.keys(files()).map((name) => [name, ro(() => files()[name] ?? '')] as const));
  return [
    ['stats_total', view(() => statsFiles(acc().total))],
    ['stats_five_minute', view(() => ctx.views.of(acc()).fiveMinute.files())],
    ['stats_hour', view(() => ctx.views.of(acc()).hour.files())],
    ['stats_day', view(() => ctx.views.of(acc()).day.files())],
  ];
}
