// `ubcache ctl status`: cache sets, bcache devices and flash-only volumes, one
// line each.

import { table } from './table.ts';
import { field, registered, selected, value, type Json } from './tree-json.ts';

export function status(root: Json): string {
  const { devices, volumes, sets } = registered(root);
  const out: string[] = [];
  out.push(
    sets.length === 0
      ? 'no cache set\n'
      : table([
          ['SET', 'AVAILABLE', 'DIRTY', 'HIT%', 'BUCKET', 'BLOCK'],
          ...sets.map(({ uuid, dir: d }) => [
            uuid,
            `${field(d, 'cache_available_percent')}%`,
            field(d, 'dirty_data'),
            field(d, 'stats_total', 'cache_hit_ratio'),
            field(d, 'bucket_size'),
            field(d, 'block_size'),
          ]),
        ]),
  );
  out.push(
    devices.length === 0
      ? 'no bcache device\n'
      : table([
          ['DEVICE', 'RUNNING', 'STATE', 'MODE', 'DIRTY', 'HIT%', 'BACKING'],
          ...devices.map(({ name, dir: b }) => [
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
  // Flash-only volumes: a table only when there are some (most caches have none).
  if (volumes.length > 0) {
    out.push(
      table([
        ['VOLUME', 'SET', 'SLOT', 'SIZE', 'LABEL'],
        ...volumes.map((v) => [v.name, v.set, String(v.slot), field(v.dir, 'size'), value(v.dir, 'label') || '-']),
      ]),
    );
  }
  return out.join('\n');
}
