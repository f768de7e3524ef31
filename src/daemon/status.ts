// The one-line status systemd shows for the unit (`systemctl status`, the
// STATUS= of sd_notify): what is served, how much dirty data waits in the
// cache, and the hit ratio since start, the three things an operator looks
// at first. Built from the registry as it is now.

import type { Registry } from '../bcache/registry.ts';
import { hprint, hitRatio } from '../bcache/stats.ts';

export function statusLine(registry: Registry): string {
  const running = registry.running;
  const waiting = registry.devices.filter((d) => !d.running && !d.stopped);
  const sets = registry.sets.size;
  let hits = 0;
  let misses = 0;
  let dirtySectors = 0;
  for (const d of registry.devices) {
    hits += d.stats.total.cacheHits;
    misses += d.stats.total.cacheMisses;
    dirtySectors += d.dirtySectors;
  }
  const parts = [
    running.length === 0
      ? 'no bcache device served'
      : `serving ${running.map((d) => `${d.name} (${d.cacheModeName}, ${d.stateName})`).join(', ')}`,
  ];
  if (waiting.length > 0) parts.push(`${waiting.map((d) => d.name).join(', ')} waiting for a cache set`);
  parts.push(`${sets} cache set${sets === 1 ? '' : 's'}`);
  parts.push(`dirty ${hprint(dirtySectors * 512)}`);
  parts.push(hits + misses === 0 ? 'hit ratio -' : `hit ratio ${hitRatio({ cacheHits: hits, cacheMisses: misses })}%`);
  if (registry.setsFailed > 0) parts.push(`${registry.setsFailed} cache set(s) failed since start`);
  return parts.join('; ');
}
