// /sys/fs/bcache/<set-uuid>/ (bcache.md §3.2-3.4): a cache set's attributes,
// its internal/ directory, cache0/ (the cache device's own attributes; in
// the kernel a link to /sys/block/<cdev>/bcache, a directory here since the
// cache device has no block device name of ours) and a bdevN link per
// attached backing device (N is its uuid slot), and flash_vol_create with a
// volumeN link per flash-only volume (flash-dir.ts).

import { CACHE_REPLACEMENT_NAMES } from '../../format/constants.ts';
import { cacheDiscard, cacheReplacement, cacheSync } from '../../format/superblock.ts';
import { choiceList, SET_ATTRIBUTES } from '../attributes.ts';
import { u64sOf } from '../btree-node.ts';
import type { RegisteredSet } from '../registry.ts';
import { CUTOFF_WRITEBACK, CUTOFF_WRITEBACK_SYNC } from '../cutoffs.ts';
import { hprint } from '../stats.ts';
import { monotonicNs } from '../time-stats.ts';
import { statsDirs, type TreeContext } from './context.ts';
import { devicePath } from './device-dir.ts';
import { parseHumanSize } from './flash-dir.ts';
import { OperationError } from '../errors.ts';
import { log } from '../../util/log.ts';
import {
  attributeFile,
  dir,
  link,
  parseUlong,
  ro,
  roRaw,
  rw,
  SysfsError,
  wo,
  type SysfsDir,
  type SysfsNode,
} from './node.ts';
import { bsetTreeStats, btreeUsedPercent, featureList, priorityStats } from './set-internals.ts';

function internalDir(set: RegisteredSet): SysfsDir {
  const cs = set.cs;
  const settable = SET_ATTRIBUTES.filter((a) => a.internal === true).map(
    (a) => [a.name, attributeFile(a, () => set)] as const,
  );
  return dir(() => [
    ...settable,
    ['active_journal_entries', ro(() => String(cs.journal.activeEntries))],
    ...btreeTimeStats(set),
    ['btree_nodes', ro(() => String(cs.gc.stats.nodes))],
    ['btree_used_percent', ro(() => String(btreeUsedPercent(cs.btree, cs.nodeGeo.nodeBytes)))],
    ['bset_tree_stats', roRaw(() => bsetTreeStats(cs.btree))],
    ['cache_read_races', ro(() => String([...set.devices].reduce((n, d) => n + d.request.cacheReadRaces, 0)))],
    // ubcache's own: the copies of hot blocks in memory (ram_cache_size).
    ['ram_cache_hits', ro(() => String(cs.ramCache.stats.hits))],
    ['ram_cache_misses', ro(() => String(cs.ramCache.stats.misses))],
    ['ram_cache_admitted', ro(() => String(cs.ramCache.stats.admitted))],
    ['ram_cache_allocated', ro(() => hprint(cs.ramCache.allocated))],
    ['reclaim', ro(() => String(cs.journal.stats.reclaims))],
    ['reclaimed_journal_buckets', ro(() => String(cs.journal.stats.reclaimedBuckets))],
    ['flush_write', ro(() => String(cs.journal.stats.nodeFlushes))],
    // sysfs_print_time_stats(&c->btree_gc_time, btree_gc, sec, ms)
    ['btree_gc_average_duration_ms', ro(() => String(cs.gc.stats.time.view(monotonicNs()).averageDurationMs))],
    ['btree_gc_average_frequency_sec', ro(() => String(cs.gc.stats.time.view(monotonicNs()).averageFrequencySec))],
    ['btree_gc_last_sec', ro(() => String(cs.gc.stats.time.view(monotonicNs()).lastSec))],
    ['btree_gc_max_duration_ms', ro(() => String(cs.gc.stats.time.view(monotonicNs()).maxDurationMs))],
    // Not in the kernel: the longest a pass held requests up (one slice of its walk), in ms.
    ['btree_gc_max_pause_ms', ro(() => String(Math.ceil(cs.gc.stats.maxPauseMs)))],
    ['writeback_keys_done', ro(() => String(set.writebackKeys.done))],
    ['writeback_keys_failed', ro(() => String(set.writebackKeys.failed))],
    [
      'trigger_gc',
      wo(() => {
        cs.triggerGc();
      }),
    ],
    [
      // bcache's CACHE_SET_IO_DISABLE switch. Writing 1 is a drill: it runs
      // the error path a real failure runs (bch_cache_set_error and the
      // retire), where the kernel's store only sets the bit. Here a failure
      // starts the retire at once, so 0 can only clear a bit never set; on a
      // set that is retiring it is refused, as the kernel cannot revive a
      // retired set either.
      'io_disable',
      rw(
        () => (cs.ioDisabled ? '1' : '0'),
        (text) => {
          const v = parseUlong('io_disable', text);
          if (v !== 0) {
            if (cs.ioDisabled) log.warn('bcache: io_disable: CACHE_SET_IO_DISABLE already set');
            else cs.fail(new Error('io_disable set through sysfs'));
            return;
          }
          if (!cs.ioDisabled) {
            log.warn('bcache: io_disable: CACHE_SET_IO_DISABLE already cleared');
            return;
          }
          throw new SysfsError(
            'EBUSY',
            `cache set ${set.uuid} is retiring after an error; register it again to use it`,
          );
        },
      ),
    ],
    ['cutoff_writeback', ro(() => String(CUTOFF_WRITEBACK))],
    ['cutoff_writeback_sync', ro(() => String(CUTOFF_WRITEBACK_SYNC))],
    ['feature_compat', roRaw(() => featureList('compat', cs.sb.featureCompat))],
    ['feature_ro_compat', roRaw(() => featureList('ro_compat', cs.sb.featureRoCompat))],
    ['feature_incompat', roRaw(() => featureList('incompat', cs.sb.featureIncompat))],
  ]);
}

/** btree_split_* (sec, us), btree_sort_* and btree_read_* (ms, us): sysfs_print_time_stats. */
function btreeTimeStats(set: RegisteredSet): Array<readonly [string, SysfsNode]> {
  const t = set.cs.btree.times;
  const files = (): Array<[string, string]> => {
    const now = monotonicNs();
    return [
      ...t.split.files('btree_split', 'sec', 'us', now),
      ...t.sort.files('btree_sort', 'ms', 'us', now),
      ...t.read.files('btree_read', 'ms', 'us', now),
    ];
  };
  return files().map(([name]) => [name, ro(() => files().find(([n]) => n === name)?.[1] ?? '')] as const);
}

function cacheDir(set: RegisteredSet): SysfsDir {
  const cs = set.cs;
  return dir(() => [
    ['bucket_size', ro(() => hprint(cs.bucketSize * 512))],
    ['block_size', ro(() => hprint(cs.blockSize * 512))],
    ['nbuckets', ro(() => String(cs.buckets.nbuckets))],
    // ubcache's own: the cache device as registered (the kernel's cache0 is a link to its /sys/block dir).
    ['dev_path', ro(() => devicePath(cs.dev.name))],
    ['discard', ro(() => (cacheDiscard(cs.sb) ? '1' : '0'))],
    ['priority_stats', roRaw(() => priorityStats(cs.buckets))],
    ['written', ro(() => hprint(cs.io.stats.sectorsWritten * 512))],
    ['btree_written', ro(() => hprint(cs.io.stats.btreeSectorsWritten * 512))],
    // The decayed count that io_error_limit is compared with (ca->io_errors >> IO_ERROR_SHIFT).
    ['io_errors', ro(() => String(cs.io.ioErrors))],
    ['metadata_written', ro(() => hprint(cs.io.stats.metaSectorsWritten * 512))],
    ['cache_replacement_policy', ro(() => choiceList(CACHE_REPLACEMENT_NAMES, cacheReplacement(cs.sb)))],
    [
      'clear_stats',
      wo(() => {
        cs.io.stats.sectorsWritten = 0;
        cs.io.stats.metaSectorsWritten = 0;
        cs.io.stats.btreeSectorsWritten = 0;
      }),
    ],
    ['set', link(`/sys/fs/bcache/${set.uuid}`)],
  ]);
}

/** % of the root node's space its keys take (bch_root_usage). */
function rootUsagePercent(set: RegisteredSet): number {
  const cs = set.cs;
  if (!cs.btree.hasRoot) return 0;
  const bytes = u64sOf(cs.btree.root.keys) * 8;
  return Math.floor((bytes * 100) / cs.nodeGeo.nodeBytes);
}

export function setDir(ctx: TreeContext, set: RegisteredSet): SysfsDir {
  const cs = set.cs;
  const settable = SET_ATTRIBUTES.filter((a) => a.internal !== true).map(
    (a) => [a.name, attributeFile(a, () => set)] as const,
  );
  return dir(() => {
    const entries: Array<readonly [string, SysfsNode]> = [
      [
        'unregister',
        wo(() => {
          ctx.background(`unregistering cache set ${set.uuid}`, () => ctx.registry.unregisterSet(set));
        }),
      ],
      [
        'stop',
        wo(() => {
          ctx.background(`stopping cache set ${set.uuid}`, () => ctx.registry.stopSet(set));
        }),
      ],
      ['synchronous', ro(() => (cacheSync(cs.sb) ? '1' : '0'))],
      [
        'flash_vol_create',
        wo(async (text) => {
          const bytes = parseHumanSize('flash_vol_create', text);
          try {
            await ctx.registry.createFlashVolume(set, bytes);
          } catch (err) {
            if (err instanceof OperationError) throw new SysfsError(err.code, err.message, { cause: err });
            throw err;
          }
        }),
      ],
      ...settable,
      ['bucket_size', ro(() => hprint(cs.bucketSize * 512))],
      ['block_size', ro(() => hprint(cs.blockSize * 512))],
      ['tree_depth', ro(() => String(cs.btree.hasRoot ? cs.btree.root.level : 0))],
      ['root_usage_percent', ro(() => String(rootUsagePercent(set)))],
      ['btree_cache_size', ro(() => hprint(cs.btree.cachedNodes * cs.nodeGeo.nodeBytes))],
      ['cache_available_percent', ro(() => String(cs.cacheAvailablePercent))],
      [
        'average_key_size',
        ro(() => hprint(cs.gc.stats.keys === 0 ? 0 : Math.floor((cs.gc.stats.data * 512) / cs.gc.stats.keys))),
      ],
      ['dirty_data', ro(() => hprint([...set.devices].reduce((n, d) => n + d.dirtySectors, 0) * 512))],
      // bch_get_congested() in bytes: 0, or the stream length past which I/O goes around the slow cache.
      ['congested', ro(() => hprint(cs.io.congestion.congested() * 512))],
      [
        'clear_stats',
        wo(() => {
          set.stats.clear();
          for (const d of set.devices) {
            const wb = d.attachment?.writeback.stats;
            if (wb) {
              wb.keysDone = 0;
              wb.keysFailed = 0;
            }
          }
        }),
      ],
      ...statsDirs(ctx, () => set.stats),
      ['internal', internalDir(set)],
      ['cache0', cacheDir(set)],
    ];
    for (const d of set.devices) {
      const att = d.attachment;
      if (att) entries.push([`bdev${att.inode}`, link(`/sys/block/${d.name}/bcache`)]);
    }
    for (const v of set.volumes.values()) entries.push([`volume${v.inode}`, link(`/sys/block/${v.name}/bcache`)]);
    return entries;
  });
}
