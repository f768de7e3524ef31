// `ubcache serve`: register cache and backing devices as writing them to
// /sys/fs/bcache/register does (in any order), attach each backing device to
// its cache set, and serve every bcache device over NBD as bcache0,
// bcache1, ... until SIGINT or SIGTERM.
//
// Shutdown (DESIGN rule 5): stop accepting, finish the requests in flight
// (new ones get ESHUTDOWN), then stop every bcache device (writeback workers
// stop, attachments end without detaching, backing devices flushed and
// closed), then every cache set (GC, dirty btree nodes written, allocator,
// a final journal entry, the superblock, the cache device closed); the
// process then exits by itself with status 0. A second signal exits at once.
// kill -9 at any moment loses nothing that was flushed (the durability
// contract, DESIGN.md).
//
// Every step is bounded (DESIGN rule 1), so SIGTERM ends the process whatever
// is stuck below: clients get --shutdown-timeout, then are dropped; devices
// get --stop-timeout, then their cache sets are stopped under them (which
// fails requests waiting on the cache), and each wait of a device's own stop
// is bounded by twice that. The exit status (a decision, see README):
// - 0 when the stop ran to its end, even if it had to drop clients or give up
//   on requests stuck below (each logged as a warning). Those requests were
//   never acknowledged, and everything acknowledged keeps its guarantee: the
//   sets still wrote their journal and superblocks. Failing a stuck request
//   is what the durability contract allows, not a failed shutdown.
// - 1 when even the bounded stop did not finish by its last-resort deadline
//   (a bug: every step has its own, smaller bound): the process exits without
//   it, as after a crash (the next start replays the journal; flushed data is
//   safe).
// - 130/143 on a second SIGINT/SIGTERM, which exits at once.
//
// While it runs, the control socket serves bcache's sysfs tree (register,
// attach, detach, stop, unregister, every attribute), /metrics and the
// dashboard's /api/stats; --http serves the read-only part on TCP. Exports
// follow the devices: one is added when a bcache device starts running and
// removed when it stops, however it stopped. Once no device and no cache
// set is left, the daemon shuts down and exits 0 on its own (DESIGN rule 5).

import { parseFaultSpec } from '../blockdev/faulty.ts';
import { openBlockDevice } from '../blockdev/open.ts';
import { parseUuid, formatUuid } from '../format/uuid-text.ts';
import {
  AttributeError,
  DEVICE_ATTRIBUTES,
  findAttribute,
  SET_ATTRIBUTES,
  type Attribute,
} from '../bcache/attributes.ts';
import type { CachedDev } from '../bcache/cached-dev.ts';
import { Registry, type RegisteredSet, type RegistryOptions } from '../bcache/registry.ts';
import { SysfsTree } from '../bcache/sysfs/tree.ts';
import { defaultControlPath } from '../control/paths.ts';
import { ControlServer } from '../control/server.ts';
import { collectStats } from '../control/stats.ts';
import { parseHttpAddress } from '../control/http-address.ts';
import { formatAddress, NbdServer, type ListenTarget } from '../nbd/server.ts';
import { deferred, errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { CliError, parseCommandArgs, type Subcommand } from './common.ts';
import { DEFAULT_LISTEN, parseListen } from './export.ts';
import { loadTls, parseTlsOptions, tlsHelp, TLS_OPTIONS } from './tls-options.ts';
import type { ServerTlsSettings } from '../nbd/server-tls.ts';

const HELP = `Usage: ubcache serve [options] DEVICE...

Register each DEVICE (a cache or a backing device made by ubcache make or
make-bcache, in any order), attach each backing device to its cache set, and
serve every bcache device over NBD as bcache0, bcache1, ... in registration
order, until SIGINT or SIGTERM. The first one is also the default export (the
empty name). A backing device whose cache set is not given is served uncached
only if its superblock says it has no cache.

Options:
  --listen HOST:PORT       listen on TCP; default 127.0.0.1:10809 when no
                           --socket is given. Repeatable. There is no
                           authentication: listen on 0.0.0.0 only on a
                           trusted network.
  --socket PATH            listen on a unix socket. Repeatable.
${tlsHelp(27)}  --control PATH           the control socket (bcache's sysfs tree over HTTP,
                           see ubcache ctl); default
                           $XDG_RUNTIME_DIR/ubcache/control.sock, else
                           /run/ubcache/control.sock. Mode 0600.
  --http [HOST:]PORT       serve the live dashboard (/), its /api/stats and
                           /metrics (Prometheus) on TCP, read-only; HOST is
                           127.0.0.1 unless given. No authentication: a
                           non-loopback HOST is allowed, with a warning.
                           --metrics is an alias.
  --set TARGET.ATTR=VALUE  set a bcache attribute before serving, with
                           bcache's names and sysfs syntax. TARGET is bcacheN
                           (a backing device), "set" (every cache set) or a
                           set's uuid. Repeatable. Examples:
                             --set bcache0.cache_mode=writeback
                             --set bcache0.writeback_running=0
                             --set bcache0.sequential_cutoff=0
                             --set set.journal_delay_ms=10
  --shutdown-timeout DURATION
                           at SIGINT/SIGTERM, how long clients' requests in
                           flight get to finish before the clients are
                           dropped (default 30s). DURATION is a number of
                           seconds, or a number with ms or s (500ms, 2s).
  --stop-timeout DURATION  then, how long the bcache devices get to stop
                           before their cache sets are stopped under them,
                           failing requests stuck waiting on the cache
                           (default 10s); each wait of a device's own stop
                           (requests, backing flush, backing close) gets twice
                           that and each cache set's stop six times that.
  --fault DEV:RULES        inject failures into DEV (one of the DEVICEs, as
                           given) for failure drills. Repeatable. RULES are
                           comma-separated ACTION[:QUALIFIER]...; actions:
                           fail-nth=N, fail-from=N, fail-range=OFF+LEN,
                           fail, pull-after=N, latency=DURATION, hold (never
                           completes until the device is closed); qualifiers:
                           read/write/flush/discard/zero (which I/O), an
                           errno (EIO, ENOSPC, ...), range=OFF+LEN, after.
                           Numbers take k, m, g or s (sectors). Examples:
                             --fault cache.img:pull-after=2000
                             --fault cache.img:fail-range=1m+4m:write
                             --fault disk.img:fail-from=10:write
                             --fault disk.img:latency=5ms:read
  -h, --help               show this help

Clients:
  nbdinfo nbd://127.0.0.1:10809/bcache0
  nbdinfo 'nbd+unix:///bcache0?socket=PATH'
`;

const usageHint = "Run 'ubcache serve --help' for the options.";

/** One --set, parsed and checked before anything is opened. */
export interface SetOption {
  text: string;
  target: { kind: 'device'; name: string } | { kind: 'sets' } | { kind: 'set'; uuid: string };
  attribute: string;
  apply: ((dev: CachedDev) => Promise<void>) | ((set: RegisteredSet) => Promise<void>);
}

export interface ServePlan {
  devices: string[];
  listen: ListenTarget[];
  tls: ServerTlsSettings;
  sets: SetOption[];
  control: string;
  /** --http (alias --metrics): the dashboard and /metrics on TCP. */
  http?: { host: string; port: number };
  /** Fault rules by device, as given (--fault DEV:RULES). */
  faults?: Map<string, string>;
  /** --shutdown-timeout: clients' time to finish at shutdown (ms). */
  shutdownTimeoutMs: number;
  /** --stop-timeout: the engine's stop bound (ms); see stopBounds(). */
  stopTimeoutMs: number;
}

export const DEFAULT_SHUTDOWN_TIMEOUT_MS = 30_000;
export const DEFAULT_STOP_TIMEOUT_MS = 10_000;

/**
 * The bounds of the engine's stop derived from --stop-timeout T: devices get
 * T before their sets are stopped under them (the registry), each wait of a
 * device's own stop 2T (so that the sets' stop, at T, can still end a
 * request waiting on the cache before the device gives up on it), each cache
 * set's stop 6T (60 s by default, the engine's own: writing a large cache's
 * dirty btree nodes takes time).
 */
export function stopBounds(stopTimeoutMs: number): { registry: number; device: number; set: number } {
  return { registry: stopTimeoutMs, device: 2 * stopTimeoutMs, set: 6 * stopTimeoutMs };
}

/**
 * The last resort: past this the stop has outlived every bound of its own
 * steps together (clients, devices whose waits and workers are each bounded,
 * sets), which only a bug can do; the process exits with status 1.
 */
export function lastResortMs(plan: Pick<ServePlan, 'shutdownTimeoutMs' | 'stopTimeoutMs'>): number {
  return plan.shutdownTimeoutMs + 20 * plan.stopTimeoutMs + 60_000;
}

/** After the stop finished, how long the process may take to exit by itself (I/O stuck in a thread, say). */
const EXIT_GRACE_MS = 2000;

/** A --shutdown-timeout / --stop-timeout value: seconds, or a number with ms or s. */
export function parseDurationOption(option: string, text: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s)?$/.exec(text.trim());
  const n = Number(m?.[1]);
  if (!m || !Number.isFinite(n)) {
    throw new CliError(`${option} '${text}' is not a duration`, {
      hint: `Write seconds or a number with ms or s, e.g. ${option} 30 or ${option} 500ms.`,
    });
  }
  const ms = Math.round(m[2] === 'ms' ? n : n * 1000);
  // setTimeout's limit (about 24.8 days); a bound of 0 would give up on every step at once.
  if (ms < 1 || ms > 2 ** 31 - 1) {
    throw new CliError(`${option} ${text}: must be at least 1ms and at most 24 days`);
  }
  return ms;
}

/** Parse the --fault options against the devices named. */
function parseFaults(texts: string[], devices: string[]): Map<string, string> {
  const faults = new Map<string, string>();
  for (const text of texts) {
    // The longest device name that prefixes the text: a path may hold colons.
    const dev = devices.filter((d) => text.startsWith(`${d}:`)).sort((a, b) => b.length - a.length)[0];
    if (dev === undefined) {
      throw new CliError(`--fault '${text}' names none of the devices (${devices.join(', ')})`, {
        hint: 'Write --fault DEVICE:RULES with DEVICE exactly as given, e.g. --fault cache.img:pull-after=1000',
      });
    }
    const rules = text.slice(dev.length + 1);
    try {
      parseFaultSpec(rules);
    } catch (err) {
      throw new CliError(`--fault ${text}: ${errorMessage(err)}`);
    }
    const prev = faults.get(dev);
    faults.set(dev, prev === undefined ? rules : `${prev},${rules}`);
  }
  return faults;
}

/** Parse one --set TARGET.ATTR=VALUE, checking the attribute and the value. */
export function parseSetOption(text: string): SetOption {
  const m = /^([^.=]+)\.([^=]+)=(.*)$/s.exec(text);
  const targetText = m?.[1];
  const attr = m?.[2];
  const value = m?.[3];
  if (targetText === undefined || attr === undefined || value === undefined) {
    throw new CliError(`--set '${text}' is not TARGET.ATTR=VALUE`, {
      hint: 'For example --set bcache0.cache_mode=writeback or --set set.journal_delay_ms=10.',
    });
  }
  const use = <T>(list: ReadonlyArray<Attribute<T>>, what: string): ((t: T) => Promise<void>) => {
    try {
      return findAttribute(list, attr, what).parse(value);
    } catch (err) {
      if (err instanceof AttributeError) throw new CliError(`--set ${text}: ${err.message}`);
      throw err;
    }
  };
  if (/^bcache\d+$/.test(targetText)) {
    return {
      text,
      target: { kind: 'device', name: targetText },
      attribute: attr,
      apply: use(DEVICE_ATTRIBUTES, targetText),
    };
  }
  if (targetText === 'set') {
    return { text, target: { kind: 'sets' }, attribute: attr, apply: use(SET_ATTRIBUTES, 'a cache set') };
  }
  const uuid = parseUuid(targetText);
  if (uuid) {
    return {
      text,
      target: { kind: 'set', uuid: formatUuid(uuid) },
      attribute: attr,
      apply: use(SET_ATTRIBUTES, `cache set ${formatUuid(uuid)}`),
    };
  }
  throw new CliError(`--set ${text}: unknown target '${targetText}'`, {
    hint: 'The target is bcacheN (a backing device, numbered in registration order), "set" or a cache set uuid.',
  });
}

/** Turn the arguments into a plan, or 'help'. Throws CliError on anything wrong. */
export function parseServeArgs(args: string[]): ServePlan | 'help' {
  const parsed = parseCommandArgs(
    args,
    {
      listen: { type: 'string', multiple: true },
      socket: { type: 'string', multiple: true },
      set: { type: 'string', multiple: true },
      control: { type: 'string' },
      http: { type: 'string' },
      metrics: { type: 'string' },
      fault: { type: 'string', multiple: true },
      'shutdown-timeout': { type: 'string' },
      'stop-timeout': { type: 'string' },
      ...TLS_OPTIONS,
      help: { type: 'boolean', short: 'h' },
    },
    usageHint,
  );
  const v = parsed.values;
  if (v.help === true) return 'help';
  const devices = parsed.positionals;
  if (devices.length === 0) {
    throw new CliError('no DEVICE to register', {
      hint: 'Name the cache and backing devices, e.g. ubcache serve cache.img disk.img',
    });
  }
  const sockets = (v.socket ?? []).map((path): ListenTarget => {
    if (path === '') throw new CliError('--socket needs a path', { hint: usageHint });
    return { path };
  });
  const tcp = (v.listen ?? []).map(parseListen);
  const listen = tcp.length === 0 && sockets.length === 0 ? [DEFAULT_LISTEN] : [...tcp, ...sockets];
  if (v.control === '') throw new CliError('--control needs a path', { hint: usageHint });
  const faults = parseFaults(v.fault ?? [], devices);
  const shutdownText = v['shutdown-timeout'];
  const stopText = v['stop-timeout'];
  const plan: ServePlan = {
    devices,
    listen,
    tls: parseTlsOptions(v, usageHint),
    sets: (v.set ?? []).map(parseSetOption),
    control: v.control ?? defaultControlPath(),
    ...(faults.size > 0 ? { faults } : {}),
    shutdownTimeoutMs:
      shutdownText === undefined
        ? DEFAULT_SHUTDOWN_TIMEOUT_MS
        : parseDurationOption('--shutdown-timeout', shutdownText),
    stopTimeoutMs: stopText === undefined ? DEFAULT_STOP_TIMEOUT_MS : parseDurationOption('--stop-timeout', stopText),
  };
  if (v.http !== undefined && v.metrics !== undefined) {
    throw new CliError('--http and --metrics are the same option: give one', { hint: usageHint });
  }
  const http = v.http ?? v.metrics;
  if (http !== undefined) plan.http = parseHttpAddress(v.http !== undefined ? '--http' : '--metrics', http);
  return plan;
}

/** Register every device, applying the --set options as each device or set appears. */
async function registerAll(plan: ServePlan, registry: Registry): Promise<void> {
  for (const spec of plan.devices) {
    let dev;
    try {
      const rules = plan.faults?.get(spec);
      dev = await openBlockDevice(rules === undefined ? spec : `faulty:${rules}@${spec}`, { exclusive: true });
    } catch (err) {
      throw new CliError(`cannot register ${spec}: ${errorMessage(err)}`);
    }
    try {
      await registry.register(dev);
    } catch (err) {
      throw new CliError(`cannot register ${spec}: ${errorMessage(err)}`);
    }
  }
  const names = new Set(registry.devices.map((d) => d.name));
  for (const s of plan.sets) {
    if (s.target.kind === 'device' && !names.has(s.target.name)) {
      throw new CliError(
        `--set ${s.text}: there is no ${s.target.name}` +
          (names.size > 0 ? ` (the backing devices are ${[...names].join(', ')})` : ' (no backing device was given)'),
      );
    }
    const target = s.target;
    if (target.kind === 'set' && !registry.sets.has(target.uuid)) {
      throw new CliError(`--set ${s.text}: no cache set ${target.uuid} was registered`);
    }
    if (target.kind === 'sets' && registry.sets.size === 0) {
      throw new CliError(`--set ${s.text}: no cache device was given`);
    }
  }
}

function configure(plan: ServePlan): RegistryOptions {
  return {
    configureDevice: async (dev) => {
      for (const s of plan.sets) {
        if (s.target.kind === 'device' && s.target.name === dev.name) {
          await (s.apply as (d: CachedDev) => Promise<void>)(dev);
        }
      }
    },
    configureSet: async (set) => {
      for (const s of plan.sets) {
        if (s.target.kind === 'sets' || (s.target.kind === 'set' && s.target.uuid === set.uuid)) {
          await (s.apply as (t: RegisteredSet) => Promise<void>)(set);
        }
      }
    },
  };
}

export const run: Subcommand = async (args) => {
  const plan = parseServeArgs(args);
  if (plan === 'help') {
    process.stdout.write(HELP);
    return 0;
  }
  // Keys and certificates are read before any device is opened: a typo costs nothing.
  const tls = loadTls(plan.tls);
  const bounds = stopBounds(plan.stopTimeoutMs);
  const registry = new Registry({
    ...configure(plan),
    open: (path) => openBlockDevice(path, { exclusive: true }),
    deviceStopTimeoutMs: bounds.registry,
    deviceOptions: { stopTimeoutMs: bounds.device },
    setOptions: { stopTimeoutMs: bounds.set },
  });
  const tree = new SysfsTree(registry);
  const server = new NbdServer([], {
    ownsDevices: false,
    allowEmpty: true,
    shutdownTimeoutMs: plan.shutdownTimeoutMs,
    ...(tls ? { tls } : {}),
  });
  const control = new ControlServer({ tree, stats: () => collectStats(registry, server.exports) });
  const stopped = deferred();
  // An object, not a boolean: the compiler cannot see the handlers change it between awaits.
  const state = { requested: false, serving: false };
  const requested = (): boolean => state.requested;
  let stopPromise: Promise<void> | undefined;
  const stopAll = (): Promise<void> => {
    stopPromise ??= (async () => {
      const deadline = lastResortMs(plan);
      let phase = 'the NBD clients';
      // Unref'd: it must not keep a finished daemon alive, only end one that cannot finish.
      const lastResort = setTimeout(() => {
        log.error(
          `shutdown did not finish within ${deadline} ms (still waiting for ${phase}); exiting without it: ` +
            'the next start recovers as after a crash (flushed data is safe)',
        );
        process.exit(1);
      }, deadline).unref();
      try {
        const treeStopped = tree.stop();
        await server.close();
        phase = 'the bcache devices and cache sets';
        await registry.stopAll();
        phase = 'the control socket';
        await treeStopped;
        await control.close();
      } finally {
        clearTimeout(lastResort);
      }
      // Everything is stopped and closed. Should something still hold the
      // event loop (an I/O that never completed, in a thread or a ring), the
      // process would never exit by itself: exit anyway, with the status the
      // command settled on.
      setTimeout(() => {
        log.warn('stopped, but I/O that never completed is still pending below; exiting without it');
        process.exit();
      }, EXIT_GRACE_MS).unref();
    })();
    return stopPromise;
  };
  const shutdown = (why: string): void => {
    state.requested = true;
    log.info(why);
    stopAll().then(
      () => {
        stopped.resolve();
      },
      (err: unknown) => {
        stopped.reject(err);
      },
    );
  };
  // Signals first, so a signal during registration still shuts down in order.
  const onSignal = (signal: NodeJS.Signals): void => {
    if (state.requested) {
      log.error(`${signal} again: exiting at once; requests in flight are abandoned (flushed data is safe)`);
      process.exit(signal === 'SIGINT' ? 130 : 143);
    }
    shutdown(`${signal}: shutting down (finishing requests in flight; send it again to exit at once)`);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const unwatch = registry.watch({
    deviceRunning: (d) => {
      try {
        server.addExport({
          name: d.name,
          description: `${d.name}: ${d.backingName}${d.attachment ? ` cached on set ${d.attachment.cs.uuid}` : ' (no cache)'}`,
          device: d.device,
          // Requests must be sector-aligned; those not aligned to the cache block bypass it.
          blockSize: { min: 512 },
        });
        if (state.serving) log.info(`export ${d.name} added (${d.backingName})`);
      } catch (err) {
        log.error(`cannot export ${d.name}: ${errorMessage(err)}`);
      }
    },
    deviceStopped: (d) => {
      if (server.exports.some((e) => e.device === d.device)) {
        void server.removeExport(d.name).then(() => {
          log.info(`export ${d.name} removed`);
        });
      }
      lastGone();
    },
    setGone: () => {
      lastGone();
    },
    // Flash-only volumes are exported as their bcacheN too, in the cache's block size.
    volumeRunning: (v) => {
      try {
        server.addExport({
          name: v.name,
          description: `${v.name}: flash-only volume ${v.inode} of cache set ${v.cs.uuid}`,
          device: v.device,
          blockSize: { min: v.blockBytes },
        });
        if (state.serving) log.info(`export ${v.name} added (flash-only volume of ${v.cs.uuid})`);
      } catch (err) {
        log.error(`cannot export ${v.name}: ${errorMessage(err)}`);
      }
    },
    volumeStopped: (v) => {
      if (server.exports.some((e) => e.device === v.device)) {
        void server.removeExport(v.name).then(() => {
          log.info(`export ${v.name} removed`);
        });
      }
    },
  });
  const lastGone = (): void => {
    if (state.serving && !state.requested && registry.empty) {
      shutdown('no bcache device and no cache set is left: shutting down');
    }
  };
  try {
    try {
      await control.listen(plan.control);
    } catch (err) {
      await stopAll();
      throw new CliError(errorMessage(err));
    }
    try {
      tree.start();
      await registerAll(plan, registry);
    } catch (err) {
      if (requested()) {
        // A signal during registration: not a failure.
        await stopped.promise;
        return 0;
      }
      await stopAll();
      throw err;
    }
    if (state.requested) {
      await stopped.promise;
      return 0;
    }
    const running = [...registry.running, ...registry.volumes];
    // Cache devices alone are served too (flash_vol_create makes volumes in
    // them); backing devices that all wait for their cache sets are not.
    if (running.length === 0 && (registry.sets.size === 0 || registry.devices.length > 0)) {
      const hint =
        registry.devices.length === 0
          ? 'Give a backing device too (ubcache make -B), not only a cache device.'
          : 'The backing devices wait for their cache sets: give their cache devices too.';
      await stopAll();
      throw new CliError('no bcache device to serve', { hint });
    }
    const exportList = running.map((d) => d.name).join(', ') || 'none yet';
    for (const target of plan.listen) {
      let bound: ListenTarget;
      try {
        bound = await server.listen(target);
      } catch (err) {
        if (requested()) break;
        await stopAll();
        throw new CliError(errorMessage(err));
      }
      log.info(
        `listening on ${formatAddress(bound)} (exports: ${exportList})` +
          (tls ? `; TLS ${tls.required ? 'required' : 'offered'}: ${tls.describe}` : ''),
      );
      if (requested()) break;
    }
    if (plan.http && !requested()) {
      try {
        const h = await control.listenHttp(plan.http.host, plan.http.port);
        log.info(`dashboard on http://${formatAddress(h)}/ (metrics on http://${formatAddress(h)}/metrics)`);
      } catch (err) {
        await stopAll();
        throw new CliError(errorMessage(err));
      }
    }
    if (!requested()) log.info(`control socket ${plan.control}`);
    state.serving = true;
    lastGone();
    await stopped.promise;
    log.info('stopped');
    return 0;
  } finally {
    unwatch();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
};
