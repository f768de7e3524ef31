// The attribute tree against the kernel's (issue 13 part 4): the same cache
// set with one backing device attached, registered by Linux in the oracle VM
// and by ubcache; every name the kernel shows under /sys/fs/bcache and
// /sys/block/bcacheN/bcache must be in ubcache's tree too, unless it is one
// of the deliberate differences below (each also listed in the README,
// Control section, with its reason).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { FileBlockDevice } from '../../src/blockdev/file.ts';
import { Registry } from '../../src/bcache/registry.ts';
import { SysfsTree } from '../../src/bcache/sysfs/tree.ts';
import { formatUuid } from '../../src/format/uuid-text.ts';
import { setLogSink } from '../../src/util/log.ts';
import { formatBacking } from '../bcache/request-helpers.ts';
import { formatCacheImage } from '../helpers/engine-images.ts';
import { ImageDir } from '../helpers/images.ts';
import { oracleSkipReason, runOracle, ORACLE_SH_PRELUDE } from '../helpers/oracle.ts';

const skip = oracleSkipReason();
const MiB = 1024 * 1024;

/**
 * Names the kernel has and ubcache deliberately does not, by directory (as
 * below: fs, set, set/internal, set/cache0, dev, and the stats directories),
 * with the reason. Keep in step with README (Control).
 */
export const DELIBERATE_DIFFERENCES: Readonly<Record<string, string>> = {
  // Kernel memory management with no counterpart in a process.
  'set/internal/prune_cache': "the kernel's shrinker: ubcache's btree node cache is bounded by itself",
  'set/internal/btree_shrinker_disabled': "the kernel's shrinker, as prune_cache",
  'set/internal/btree_cache_max_chain': "the longest chain of the kernel's btree node hash table; a Map here",
  'set/internal/gc_always_rewrite':
    "a debugging knob of the kernel's GC (rewrite every node it visits); ubcache's GC rewrites mostly stale leaves only",
};

/** The directories compared, as `label: path below the set or device`. */
const SET_DIRS = ['', 'internal', 'cache0', 'stats_total', 'stats_five_minute', 'stats_hour', 'stats_day'];
const DEV_DIRS = ['', 'stats_total', 'stats_five_minute', 'stats_hour', 'stats_day'];

/** Files whose values are compared: exactly, or by shape (every number replaced by N). */
const EXACT_VALUES = [
  'internal/copy_gc_enabled',
  'internal/gc_after_writeback',
  'internal/feature_compat',
  'internal/feature_ro_compat',
  'internal/feature_incompat',
];
const SHAPED_VALUES = [
  // Off by default in ubcache (README, Control), 2000 and 20000 in the kernel.
  'congested_read_threshold_us',
  'congested_write_threshold_us',
  'congested',
  'internal/active_journal_entries',
  'internal/bset_tree_stats',
  'internal/btree_used_percent',
  'internal/cache_read_races',
  'internal/reclaim',
  'internal/reclaimed_journal_buckets',
  'internal/flush_write',
  ...['split', 'sort', 'read'].flatMap((w) => {
    const [f, d] = w === 'split' ? ['sec', 'us'] : ['ms', 'us'];
    return [
      `internal/btree_${w}_average_frequency_${f}`,
      `internal/btree_${w}_average_duration_${d}`,
      `internal/btree_${w}_max_duration_${d}`,
      `internal/btree_${w}_last_${f}`,
    ];
  }),
  'cache0/priority_stats',
  'cache0/btree_written',
  'cache0/metadata_written',
];

function shape(v: string): string {
  return v.replace(/-?[0-9]+/g, 'N');
}

/** "V|file" ... "E|" blocks printed by the script: each file's content. */
function kernelValues(output: string): Map<string, string> {
  const values = new Map<string, string>();
  let file: string | undefined;
  let lines: string[] = [];
  for (const line of output.split('\n')) {
    if (line.startsWith('V|')) {
      file = line.slice(2).trim();
      lines = [];
    } else if (line.trim() === 'E|' && file !== undefined) {
      values.set(file, lines.map((l) => `${l.replace(/\r$/, '')}\n`).join(''));
      file = undefined;
    } else if (file !== undefined) lines.push(line);
  }
  return values;
}

function label(base: string, sub: string): string {
  return sub === '' ? base : `${base}/${sub}`;
}

/** Every name of the kernel's tree, as "dir/name". */
function kernelNames(output: string): Set<string> {
  const names = new Set<string>();
  for (const line of output.split('\n')) {
    const m = /^L\|([^|]*)\|(.+)$/.exec(line.trim());
    if (m?.[1] !== undefined && m[2] !== undefined) names.add(`${m[1]}/${m[2]}`);
  }
  return names;
}

test(
  "ubcache's attribute tree has every name of the kernel's, but the documented differences",
  { skip, timeout: 600_000 },
  async () => {
    const dir = new ImageDir('ubcache-oracle-tree-');
    try {
      const cachePath = dir.zeroed('cache.img', 64 * MiB);
      const bdevPath = dir.zeroed('bdev.img', 64 * MiB);
      const setUuid = randomBytes(16);
      await formatCacheImage(cachePath, { setUuid, bucketSize: 64, blockSize: 8 });
      const b = await FileBlockDevice.open(bdevPath);
      await formatBacking(b, { setUuid, dataOffset: 16, blockSize: 8 });
      await b.close();
      const set = formatUuid(setUuid);

      // Ours.
      const ours = new Set<string>();
      const ourValues = new Map<string, string>();
      const restore = setLogSink(() => undefined);
      try {
        const registry = new Registry({});
        await registry.register(await FileBlockDevice.open(cachePath, { exclusive: true }));
        await registry.register(await FileBlockDevice.open(bdevPath, { exclusive: true }));
        const tree = new SysfsTree(registry);
        for (const n of tree.list('/sys/fs/bcache')) ours.add(`fs/${n === set ? 'SET' : n}`);
        for (const d of SET_DIRS) {
          for (const n of tree.list(`/sys/fs/bcache/${set}/${d}`)) ours.add(`${label('set', d)}/${n}`);
        }
        for (const d of DEV_DIRS) {
          for (const n of tree.list(`/sys/block/bcache0/bcache/${d}`)) ours.add(`${label('dev', d)}/${n}`);
        }
        for (const f of [...EXACT_VALUES, ...SHAPED_VALUES]) ourValues.set(f, tree.read(`/sys/fs/bcache/${set}/${f}`));
        await tree.stop();
        await registry.stopAll();
      } finally {
        restore();
      }

      // The kernel's.
      const script = [
        ORACLE_SH_PRELUDE,
        'echo /dev/vda >/sys/fs/bcache/register',
        'echo /dev/vdb >/sys/fs/bcache/register',
        'waitfor /sys/block/vdb/bcache/cache || { dmesg | grep bcache; exit 1; }',
        'bdev=$(ls /sys/block/vdb/holders)',
        'list() { for n in $(ls -1 "$1/"); do echo "L|$2|$n"; done; }',
        `for n in $(ls -1 /sys/fs/bcache/); do [ "$n" = ${set} ] && n=SET; echo "L|fs|$n"; done`,
        ...SET_DIRS.map((d) => `list /sys/fs/bcache/${set}/${d} ${label('set', d)}`),
        ...DEV_DIRS.map((d) => `list /sys/block/$bdev/bcache/${d} ${label('dev', d)}`),
        `for f in ${[...EXACT_VALUES, ...SHAPED_VALUES].join(' ')}; do echo "V|$f"; cat /sys/fs/bcache/${set}/$f; echo "E|"; done`,
        'echo 1 >/sys/block/vdb/bcache/stop',
        `echo 1 >/sys/fs/bcache/${set}/stop`,
        `waitgone /sys/fs/bcache/${set}`,
      ];
      const r = await runOracle(script.join('\n') + '\n', [cachePath, bdevPath]);
      assert.equal(r.status, 0, `${r.output}\n${r.stderr}`);
      const theirs = kernelNames(r.output);
      assert.ok(theirs.has('set/internal/btree_nodes') && theirs.has('dev/cache_mode'), r.output);

      const missing = [...theirs].filter((n) => !ours.has(n) && DELIBERATE_DIFFERENCES[n] === undefined).sort();
      assert.deepEqual(missing, [], `in the kernel's tree, not in ubcache's:\n${missing.join('\n')}`);
      // The allowlist names only what the kernel really has (no stale entries).
      const stale = Object.keys(DELIBERATE_DIFFERENCES).filter((n) => !theirs.has(n));
      assert.deepEqual(stale, [], 'allowlist entries the kernel does not have');
      const implemented = Object.keys(DELIBERATE_DIFFERENCES).filter((n) => ours.has(n));
      if (implemented.length > 0) {
        process.stdout.write(`# allowlisted but present in ubcache now (drop them): ${implemented.join(' ')}\n`);
      }
      // Values: exactly the kernel's where a fresh set has one answer, else the same shape.
      const values = kernelValues(r.output);
      for (const f of EXACT_VALUES) assert.equal(ourValues.get(f), values.get(f), `${f}: kernel vs ubcache`);
      for (const f of SHAPED_VALUES) {
        const theirsV = values.get(f);
        assert.ok(theirsV !== undefined, `${f} read in the VM`);
        assert.equal(shape(ourValues.get(f) ?? ''), shape(theirsV), `${f}: the kernel's format`);
      }
      const extra = [...ours].filter((n) => !theirs.has(n)).sort();
      process.stdout.write(`# ubcache's own names (not in the kernel's tree): ${extra.join(' ')}\n`);
    } finally {
      dir.remove();
    }
  },
);
