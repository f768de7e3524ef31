// /sys/block/bcacheN/bcache/: a backing device's attributes (bcache.md §3.5).
// The settable tunables come from attributes.ts; here are the read-only
// values (writeback_rate_debug's text among them), the actions (attach, detach, stop, running, clear_stats) and the
// stats directories. Every registered backing device has this directory,
// also one still waiting for its cache set (the kernel shows those under the
// backing block device; we have no such name, and `running` and `stop` must
// be reachable for them).

import { basename, resolve } from 'node:path';
import { DEVICE_ATTRIBUTES } from '../attributes.ts';
import type { CachedDev } from '../cached-dev.ts';
import { OperationError } from '../errors.ts';
import { hprint } from '../stats.ts';
import { statsDirs, type TreeContext } from './context.ts';
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

/** A one-stripe device: the kernel's stripe when the backing device reports no optimal I/O size. */
const DEFAULT_STRIPE_SECTORS = 2 ** 31;

/**
 * writeback_rate_debug (read-only), the kernel's exact text: sizes as
 * bch_hprint prints them, everything but dirty and target 0 while
 * writeback_running is 0; next io is how far the rate limiter's schedule is
 * ahead of now (negative: behind), in whole ms.
 */
export function writebackRateDebug(dev: CachedDev, nowMs: number = dev.clock.now()): string {
  const wb = dev.settings.writebackRunning;
  const st = dev.writebackRateState;
  const next = st.limiter.next;
  const nextIo = wb && next !== 0 ? Math.trunc(next - nowMs) : 0;
  const h = (sectors: number): string => hprint(sectors * 512);
  return (
    `rate:\t\t${h(wb ? dev.settings.writebackRate : 0)}/sec\n` +
    `dirty:\t\t${h(dev.dirtySectors)}\n` +
    `target:\t\t${h(st.target)}\n` +
    `proportional:\t${h(wb ? st.proportional : 0)}\n` +
    `integral:\t${h(wb ? st.integralScaled : 0)}\n` +
    `change:\t\t${h(wb ? st.change : 0)}/sec\n` +
    `next io:\t${nextIo}ms\n`
  );
}

/**
 * ubcache's own: the device as it was registered, a local path made
 * absolute (the daemon's working directory is not the reader's) and a URI
 * or other spec as it is. `ubcache ctl` names devices by it, as bcache-tools
 * names them by /dev path.
 */
export function devicePath(name: string): string {
  return /^[a-z][a-z0-9+.-]*:/i.test(name) ? name : resolve(name);
}

/** An engine operation's refusal, as the sysfs store returns it. */
function refused(err: unknown): never {
  if (err instanceof OperationError) throw new SysfsError(err.code, err.message, { cause: err });
  throw err;
}

export function deviceDir(ctx: TreeContext, dev: CachedDev): SysfsDir {
  const settable = DEVICE_ATTRIBUTES.map((a) => {
    if (a.name === 'writeback_rate') {
      // Shown as 0 while no writeback runs (not attached, or writeback_running 0).
      return [
        a.name,
        attributeFile(
          a,
          () => dev,
          (d) => (d.attachment && d.settings.writebackRunning ? a.show(d) : hprint(0)),
        ),
      ] as const;
    }
    return [a.name, attributeFile(a, () => dev)] as const;
  });
  return dir(() => {
    const entries: Array<readonly [string, SysfsNode]> = [
      [
        'attach',
        wo(async (text) => {
          await ctx.registry.attach(dev, text).catch(refused);
        }),
      ],
      [
        'detach',
        wo(() => {
          if (dev.attachment) ctx.background(`detaching ${dev.name}`, () => dev.detach());
        }),
      ],
      [
        'stop',
        wo(() => {
          ctx.background(`stopping ${dev.name}`, () => dev.stop());
        }),
      ],
      [
        'running',
        rw(
          () => (dev.running ? '1' : '0'),
          async (text) => {
            if (parseUlong('running', text) === 0) return;
            if (dev.stopped) throw new SysfsError('EIO', `${dev.name} is stopping; register it again to run it`);
            if (dev.running) throw new SysfsError('EBUSY', `cached dev ${dev.backingName} is running already`);
            await dev.runStale().catch(refused);
          },
        ),
      ],
      ['state', ro(() => dev.stateName)],
      ['dirty_data', ro(() => hprint(dev.dirtySectors * 512))],
      // Backing device errors (dc->io_errors, never decayed); io_disable comes at io_error_limit.
      ['io_errors', ro(() => String(dev.ioErrors))],
      [
        'clear_stats',
        wo(() => {
          dev.stats.clear();
        }),
      ],
      ['writeback_rate_debug', roRaw(() => writebackRateDebug(dev))],
      ['stripe_size', ro(() => hprint(DEFAULT_STRIPE_SECTORS * 512))],
      ['partial_stripes_expensive', ro(() => '0')],
      ['backing_dev_name', ro(() => basename(dev.backingName))],
      ['backing_dev_uuid', ro(() => dev.uuid)],
      ['backing_dev_path', ro(() => devicePath(dev.backingName))],
      ...settable,
      // ubcache's own: what the admission policy decided (0 under `always`).
      ['cache_admission_admitted', ro(() => String(dev.request.admissionStats.admitted))],
      ['cache_admission_declined', ro(() => String(dev.request.admissionStats.declined))],
      ...statsDirs(ctx, () => dev.stats),
    ];
    if (dev.running) entries.push(['dev', link(`/sys/block/${dev.name}`)]);
    // ubcache's own, for a backing device reached over a network (an NBD URI): its outages.
    const backing = dev.backing;
    if (backing.stats && backing.setOutageTimeout) {
      const stats = backing.stats.bind(backing);
      const setTimeout = backing.setOutageTimeout.bind(backing);
      entries.push(
        [
          'backing_outage_timeout_ms',
          rw(
            () => String(stats().outageTimeoutMs),
            (text) => {
              try {
                setTimeout(parseUlong('backing_outage_timeout_ms', text));
              } catch (err) {
                if (err instanceof RangeError) throw new SysfsError('EINVAL', err.message);
                throw err;
              }
            },
          ),
        ],
        ['backing_reconnects', ro(() => String(stats().reconnects))],
        ['backing_outage_ms', ro(() => String(Math.round(stats().outageMs)))],
      );
    }
    const att = dev.attachment;
    if (att) entries.push(['cache', link(`/sys/fs/bcache/${att.set.uuid}`)]);
    return entries;
  });
}
