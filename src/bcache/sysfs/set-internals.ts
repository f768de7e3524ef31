// The multi-line and computed files of a cache set's internal/ and cache0/
// directories, in the kernel's exact formats (sysfs.c): priority_stats,
// bset_tree_stats, btree_used_percent and the feature_* lists.

import { INITIAL_PRIO, BTREE_PRIO, GC_MARK_DIRTY, GC_MARK_METADATA, GC_MARK_RECLAIMABLE } from '../buckets.ts';
import type { Buckets } from '../buckets.ts';
import type { Btree } from '../btree.ts';

/** Quantiles priority_stats prints. */
const QUANTILES = 31;

/**
 * cache0/priority_stats: how the buckets are used (percentages by
 * GC_SECTORS_USED and gc mark) and the spread of data buckets' priorities
 * (INITIAL_PRIO - prio: how long since they were last used), as 31
 * quantiles of the buckets that have a priority and are not btree nodes.
 */
export function priorityStats(b: Buckets): string {
  const n0 = b.nbuckets;
  let unused = 0;
  let available = 0;
  let dirty = 0;
  let meta = 0;
  for (let i = b.firstBucket; i < n0; i++) {
    if ((b.used[i] ?? 0) === 0) unused++;
    const mark = b.mark[i];
    if (mark === GC_MARK_RECLAIMABLE) available++;
    else if (mark === GC_MARK_DIRTY) dirty++;
    else if (mark === GC_MARK_METADATA) meta++;
  }
  // Every bucket's prio (the kernel's array holds the first buckets as 0), highest first.
  const prios = new Uint16Array(n0);
  for (let i = b.firstBucket; i < n0; i++) prios[i] = b.prio[i] ?? 0;
  prios.sort().reverse();
  let end = n0;
  while (end > 0 && prios[end - 1] === 0) end--;
  let start = 0;
  while (start < end && prios[start] === BTREE_PRIO) start++;
  const n = end - start;
  let sum = 0;
  for (let i = start; i < end; i++) sum += INITIAL_PRIO - (prios[i] ?? 0);
  const average = n > 0 ? Math.floor(sum / n) : sum;
  const q: number[] = [];
  for (let i = 0; i < QUANTILES; i++) {
    // u16 arithmetic, as the kernel's q[] is.
    q.push((INITIAL_PRIO - (prios[start + Math.floor((n * (i + 1)) / (QUANTILES + 1))] ?? 0)) & 0xffff);
  }
  const pct = (x: number): number => Math.floor((x * 100) / n0);
  return (
    `Unused:\t\t${pct(unused)}%\n` +
    `Clean:\t\t${pct(available)}%\n` +
    `Dirty:\t\t${pct(dirty)}%\n` +
    `Metadata:\t${pct(meta)}%\n` +
    `Average:\t${average}\n` +
    `Sectors per Q:\t${Math.floor((n * b.bucketSize) / (QUANTILES + 1))}\n` +
    `Quantiles:\t[${q.join(' ')}]\n`
  );
}

/**
 * internal/bset_tree_stats over the nodes in memory. ubcache keeps a node
 * as one sorted array (the bsets read from disk merged) plus the keys not
 * yet written, with no auxiliary search tree: so one written set per node
 * with keys, one unwritten set per node with pending keys, and no floats
 * (or failed ones) to count.
 */
export function bsetTreeStats(btree: Btree): string {
  let nodes = 0;
  let written = 0;
  let unwritten = 0;
  let writtenBytes = 0;
  let unwrittenBytes = 0;
  for (const node of btree.nodesInMemory()) {
    nodes++;
    const pending = node.pendingU64s;
    const onDisk = Math.max(0, node.viewU64s - pending);
    if (node.written > 0 || onDisk > 0) written++;
    if (pending > 0) unwritten++;
    writtenBytes += onDisk * 8;
    unwrittenBytes += pending * 8;
  }
  return (
    `btree nodes:\t\t${nodes}\n` +
    `written sets:\t\t${written}\n` +
    `unwritten sets:\t\t${unwritten}\n` +
    `written key bytes:\t${writtenBytes}\n` +
    `unwritten key bytes:\t${unwrittenBytes}\n` +
    `floats:\t\t\t0\n` +
    `failed:\t\t\t0\n`
  );
}

/**
 * internal/btree_used_percent over the nodes in memory: key u64s * 100 /
 * (nodes * node bytes), the kernel's formula (its gc_stats.key_bytes counts
 * u64s despite its name).
 */
export function btreeUsedPercent(btree: Btree, nodeBytes: number): number {
  let nodes = 0;
  let u64s = 0;
  for (const node of btree.nodesInMemory()) {
    nodes++;
    u64s += node.viewU64s;
  }
  return Math.floor((u64s * 100) / (Math.max(1, nodes) * nodeBytes));
}

/** The known feature bits by class (features.c feature_list): only large_bucket, an incompat one. */
const FEATURES: ReadonlyArray<{ kind: 'compat' | 'ro_compat' | 'incompat'; mask: bigint; name: string }> = [
  { kind: 'incompat', mask: 1n, name: 'large_bucket' },
];

/**
 * internal/feature_compat, _ro_compat, _incompat: the known features of the
 * class, set ones in brackets, a newline after them; nothing at all for a
 * class with no known feature.
 */
export function featureList(kind: 'compat' | 'ro_compat' | 'incompat', bits: bigint): string {
  const names = FEATURES.filter((f) => f.kind === kind).map((f) => ((bits & f.mask) !== 0n ? `[${f.name}]` : f.name));
  return names.length === 0 ? '' : `${names.join(' ')}\n`;
}
