// The in_use thresholds (percent of the cache set's buckets not available)
// at which the request path and writeback change what they do: the kernel's
// CUTOFF_* constants and bch_cutoff_writeback{,_sync} module parameters.
// Their own file, so that the request path, writeback and sysfs share them
// without importing each other.

/** CUTOFF_CACHE_ADD: above this in_use, nothing new is cached. */
export const CUTOFF_CACHE_ADD = 95;
/** CUTOFF_CACHE_READA: from this in_use on, misses are no longer rounded up by readahead. */
export const CUTOFF_CACHE_READA = 90;
/**
 * bch_cutoff_writeback and bch_cutoff_writeback_sync (module parameters),
 * shown in internal/; NBD writes all count as sync (shouldWriteback).
 */
export const CUTOFF_WRITEBACK = 40;
export const CUTOFF_WRITEBACK_SYNC = 70;
