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
// removed when it stops, however it stopped.
//
// A service (DESIGN rule 5): the daemon outlives its devices, as the
// kernel's bcache module does. It starts with no device at all if given
// none, and keeps running when devices stop, fail or are unregistered, so
// that its control socket and /metrics are there when an operator needs
// them most, right after a failure. It stops on SIGINT/SIGTERM, on a write
// of 1 to /sys/fs/bcache/shutdown (the control socket), when the --run
// command exits, or with --exit-when-idle once no device and no cache set
// is left (the one-shot behaviour). Around that, the service conventions of
// nbdkit and systemd: --run (src/daemon/captive.ts), -P/--pidfile,
// --exit-with-parent, sd_notify readiness and status, socket activation,
// journal priorities (src/daemon/*.ts, src/util/log.ts).

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
import { RegisteredSet, Registry, type RegistryOptions } from '../bcache/registry.ts';
import { SysfsTree } from '../bcache/sysfs/tree.ts';
import { defaultControlPath } from '../control/paths.ts';
import { ControlServer } from '../control/server.ts';
import { collectStats } from '../control/stats.ts';
import { parseHttpAddress } from '../control/http-address.ts';
import { formatAddress, NbdServer, type ListenTarget } from '../nbd/server.ts';
import { deferred, errorMessage } from '../util/lifecycle.ts';
import { log, setLogLevel } from '../util/log.ts';
import { CliError, packageVersion, parseCommandArgs, type Subcommand } from './common.ts';
import { captiveEnv, runCaptive, type Captive } from '../daemon/captive.ts';
import { notifierFromEnv, statusMessage } from '../daemon/notify.ts';
import { exitWithParent } from '../daemon/parent.ts';
import { writePidfile } from '../daemon/pidfile.ts';
import { listenFdsFromEnv, SocketActivationError } from '../daemon/socket-activation.ts';
import { statusLine } from '../daemon/status.ts';
import { ConfigError, loadServeConfig, type ConfigSection, type ServeConfig } from '../daemon/config.ts';
import { SysfsError, wo } from '../bcache/sysfs/node.ts';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve as resolvePath } from 'node:path';
import type { BlockDevice } from '../blockdev/types.ts';
import { DEFAULT_LISTEN, parseListen } from './export.ts';
import { loadTls, parseTlsOptions, tlsHelp, TLS_OPTIONS } from './tls-options.ts';
import type { ServerTlsSettings } from '../nbd/server-tls.ts';

const HELP = `Usage: ubcache serve [options] [DEVICE...]

Register each DEVICE (a cache or a backing device made by ubcache make or
make-bcache, in any order), attach each backing device to its cache set, and
serve every bcache device over NBD as bcache0, bcache1, ... in registration
order. The first one is also the default export (the empty name). A backing
device whose cache set is not given is served uncached only if its
superblock says it has no cache.

serve is a service, as the kernel's bcache module: with no DEVICE it starts
empty, waiting for devices written to /sys/fs/bcache/register on the control
socket, and it keeps running when its devices stop, fail or are
unregistered. It stops on SIGINT or SIGTERM, or when told to:
  ubcache ctl write /sys/fs/bcache/shutdown 1

Options:
  --listen HOST:PORT       listen on TCP; default 127.0.0.1:10809 when no
                           other listener is given. Repeatable. There is no
                           authentication: listen on 0.0.0.0 only on a
                           trusted network.
  -p, --port PORT          listen on TCP port PORT (of -i, else 127.0.0.1)
  -i, --ipaddr IPADDR      listen on IPADDR (port -p, else 10809)
  --socket PATH            listen on a unix socket. Repeatable.
  -U, --unix PATH|-        the same; "-" makes a private socket in a new
                           temporary directory (for --run). Repeatable.
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
  -r, --read-only          serve every export read-only (writes get EPERM)
  --exit-when-idle         exit once no bcache device and no cache set is
                           left (and at start if there is nothing to serve),
                           instead of waiting for more
  --run 'CMD'              captive mode (as nbdkit's): once listening, run CMD
                           with sh -c and $uri, $nbd (the default export's
                           NBD URI), $uri_bcache0, ... (one per export),
                           $unixsocket, $port, $exportname set; stop when CMD
                           exits and exit with its status
  -P, --pidfile FILE       write the pid to FILE once ready (left at exit)
  --exit-with-parent       stop when the process that started serve exits
  -f, --foreground         accepted for nbdkit's sake: serve never forks
  -v, --verbose            debug messages (UBCACHE_LOG=debug)
  -V, --version            print the version and exit
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

systemd: with $NOTIFY_SOCKET set (Type=notify) serve sends READY=1 once
serving, STATUS= lines and STOPPING=1; with $LISTEN_FDS (socket activation)
it accepts NBD clients on the sockets passed instead of listening itself;
with $JOURNAL_STREAM its log lines carry journal priorities. See
contrib/ubcache.service.

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
  // --- The service options (nbdkit's conventions) ---
  /** Listeners were named (--listen, --socket, -U, -p, -i), so socket activation is refused. */
  listenGiven: boolean;
  /** -U -: a private unix socket in a new temporary directory. */
  privateSocket: boolean;
  /** -r/--read-only: every export is read-only. */
  readOnly: boolean;
  /** --exit-when-idle: exit once nothing is left, and at start if nothing can be served. */
  exitWhenIdle: boolean;
  /** --run CMD: captive mode. */
  run?: string;
  /** -P/--pidfile FILE */
  pidfile?: string;
  /** --exit-with-parent */
  exitWithParent: boolean;
  /** -v/--verbose */
  verbose: boolean;
  /** -V/--version: print the version and exit. */
  version: boolean;
  /** --config FILE, read and checked. */
  config?: ServeConfig;
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
  const first = parseOptions(args);
  const configPath = first.values.config;
  if (configPath === undefined) return buildPlan(first, undefined);
  // --- --config FILE: its [serve] options go first, so the command line's win; its devices first too ---
  if (configPath === '') throw new CliError('--config needs a path', { hint: usageHint });
  let config: ServeConfig;
  try {
    config = loadServeConfig(configPath);
  } catch (err) {
    if (err instanceof ConfigError) throw new CliError(err.message);
    throw err;
  }
  // Each [serve] value checked alone, so that an error names its line.
  config.serveArgs.forEach((arg, i) => {
    try {
      parseServeArgs([arg]);
    } catch (err) {
      if (err instanceof CliError) throw new CliError(`${config.serveWhere[i] ?? config.path}: ${err.message}`);
      throw err;
    }
  });
  return buildPlan(parseOptions([...config.serveArgs, ...args]), config);
}

function parseOptions(args: string[]) {
  return parseCommandArgs(
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
      ...SERVICE_OPTIONS,
      config: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    usageHint,
  );
}

function buildPlan(parsed: ReturnType<typeof parseOptions>, config: ServeConfig | undefined): ServePlan | 'help' {
  const v = parsed.values;
  if (v.help === true) return 'help';
  const configDevices = (config?.sections ?? []).flatMap((c) =>
    c.target.kind === 'cache' || c.target.kind === 'backing' ? [c.target.path] : [],
  );
  const devices = [...configDevices, ...parsed.positionals];
  if (devices.length === 0 && v['exit-when-idle'] === true && v.version !== true) {
    throw new CliError('no DEVICE to register, and --exit-when-idle would exit at once', {
      hint: 'Name the cache and backing devices, e.g. ubcache serve cache.img disk.img',
    });
  }
  const unix = (v.unix ?? []).filter((p) => p !== '-');
  const sockets = [...(v.socket ?? []), ...unix].map((path): ListenTarget => {
    if (path === '') throw new CliError('--socket needs a path', { hint: usageHint });
    return { path };
  });
  const tcp = (v.listen ?? []).map(parseListen);
  const portTcp = parsePortOptions(v.port, v.ipaddr);
  if (portTcp) tcp.push(portTcp);
  const privateSocket = (v.unix ?? []).includes('-');
  const listenGiven = tcp.length > 0 || sockets.length > 0 || privateSocket;
  const listen = listenGiven ? [...tcp, ...sockets] : [DEFAULT_LISTEN];
  if (v.control === '') throw new CliError('--control needs a path', { hint: usageHint });
  if (v.run === '') throw new CliError('--run needs a command', { hint: usageHint });
  if (v.pidfile === '') throw new CliError('--pidfile needs a path', { hint: usageHint });
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
    listenGiven,
    privateSocket,
    readOnly: v['read-only'] === true || v.readonly === true,
    exitWhenIdle: v['exit-when-idle'] === true,
    ...(v.run !== undefined ? { run: v.run } : {}),
    ...(v.pidfile !== undefined ? { pidfile: v.pidfile } : {}),
    exitWithParent: v['exit-with-parent'] === true,
    verbose: v.verbose === true,
    version: v.version === true,
    ...(config ? { config } : {}),
  };
  if (v.http !== undefined && v.metrics !== undefined) {
    throw new CliError('--http and --metrics are the same option: give one', { hint: usageHint });
  }
  const http = v.http ?? v.metrics;
  if (http !== undefined) plan.http = parseHttpAddress(v.http !== undefined ? '--http' : '--metrics', http);
  return plan;
}

// --- The service options: nbdkit's names and short options where they mean the same ---

const SERVICE_OPTIONS = {
  unix: { type: 'string', short: 'U', multiple: true },
  port: { type: 'string', short: 'p' },
  ipaddr: { type: 'string', short: 'i' },
  'read-only': { type: 'boolean', short: 'r' },
  readonly: { type: 'boolean' },
  'exit-when-idle': { type: 'boolean' },
  run: { type: 'string' },
  pidfile: { type: 'string', short: 'P' },
  'exit-with-parent': { type: 'boolean' },
  foreground: { type: 'boolean', short: 'f' },
  verbose: { type: 'boolean', short: 'v' },
  version: { type: 'boolean', short: 'V' },
} as const;

/**
 * -p PORT and -i IPADDR: one TCP listener, as nbdkit's. nbdkit listens on
 * every interface without -i; serve keeps to loopback (127.0.0.1), as with
 * no option at all: NBD has no authentication without --tls.
 */
function parsePortOptions(port: string | undefined, ipaddr: string | undefined): ListenTarget | undefined {
  if (port === undefined && ipaddr === undefined) return undefined;
  let n: number = DEFAULT_LISTEN_PORT;
  if (port !== undefined) {
    n = Number(port);
    if (!/^\d+$/.test(port) || n > 65535) {
      throw new CliError(`-p/--port '${port}' is not a TCP port number`, { hint: 'For example -p 10809.' });
    }
  }
  const host = ipaddr ?? '127.0.0.1';
  if (host === '' || /[\s/]/.test(host)) throw new CliError(`-i/--ipaddr '${host}' is not an address`);
  return { host: host.replace(/^\[(.*)\]$/, '$1'), port: n };
}

const DEFAULT_LISTEN_PORT = 10809;

/** Register every device, applying the --set options as each device or set appears. */
async function registerAll(plan: ServePlan, registry: Registry, paths: DevicePaths): Promise<void> {
  for (const spec of plan.devices) {
    let dev;
    try {
      const rules = plan.faults?.get(spec);
      dev = await openBlockDevice(rules === undefined ? spec : `faulty:${rules}@${spec}`, { exclusive: true });
    } catch (err) {
      throw new CliError(`cannot register ${spec}: ${errorMessage(err)}`);
    }
    paths.set(dev, spec);
    let registered;
    try {
      registered = await registry.register(dev);
    } catch (err) {
      throw new CliError(`cannot register ${spec}: ${errorMessage(err)}`);
    }
    // A config section said what the device is: the superblock must agree.
    const said = plan.config?.sections.find(
      (c) => (c.target.kind === 'cache' || c.target.kind === 'backing') && c.target.path === spec,
    );
    if (said && said.target.kind !== registered.kind) {
      throw new CliError(
        `${said.where}: ${spec} is a ${registered.kind} device, not a ${said.target.kind} device; ` +
          `write [${registered.kind} "${spec}"] (its attributes are then ${registered.kind === 'cache' ? "its cache set's" : "a backing device's"})`,
      );
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

/** The path (or URI) each device was opened by, at start or by a runtime register: config sections name devices by path. */
type DevicePaths = WeakMap<BlockDevice, string>;

/** Does a config section name this backing device or cache set? */
function sectionMatches(c: ConfigSection, paths: DevicePaths, dev: CachedDev | RegisteredSet): boolean {
  const t = c.target;
  if (dev instanceof RegisteredSet) {
    if (t.kind === 'sets') return true;
    if (t.kind === 'set') return t.uuid === dev.uuid;
    return t.kind === 'cache' && samePath(paths.get(dev.cs.dev), t.path);
  }
  if (t.kind === 'backing-uuid') return t.uuid === dev.uuid;
  return t.kind === 'backing' && samePath(paths.get(dev.backing), t.path);
}

function samePath(opened: string | undefined, path: string): boolean {
  if (opened === undefined) return false;
  return /^[a-z+]+:\/\//.test(opened) ? opened === path : resolvePath(opened) === path;
}

function configure(plan: ServePlan, paths: DevicePaths): RegistryOptions {
  // The config file's settings first, then --set: the command line wins.
  const sections = plan.config?.sections ?? [];
  return {
    configureDevice: async (dev) => {
      for (const c of sections) {
        if (c.target.kind !== 'backing' && c.target.kind !== 'backing-uuid') continue;
        if (!sectionMatches(c, paths, dev)) continue;
        for (const setting of c.settings) await (setting.apply as (d: CachedDev) => Promise<void>)(dev);
      }
      for (const s of plan.sets) {
        if (s.target.kind === 'device' && s.target.name === dev.name) {
          await (s.apply as (d: CachedDev) => Promise<void>)(dev);
        }
      }
    },
    configureSet: async (set) => {
      for (const c of sections) {
        if (c.target.kind !== 'cache' && c.target.kind !== 'set' && c.target.kind !== 'sets') continue;
        if (!sectionMatches(c, paths, set)) continue;
        for (const setting of c.settings) await (setting.apply as (t: RegisteredSet) => Promise<void>)(set);
      }
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
  if (plan.version) {
    process.stdout.write(`ubcache ${packageVersion()}\n`);
    return 0;
  }
  if (plan.verbose) setLogLevel('debug');
  // Keys and certificates are read before any device is opened: a typo costs nothing.
  const tls = loadTls(plan.tls);
  // --- Service: what systemd or the caller passed in (read once, removed from the environment) ---
  let activated: number[];
  try {
    activated = listenFdsFromEnv();
  } catch (err) {
    if (err instanceof SocketActivationError) throw new CliError(`socket activation: ${err.message}`);
    throw err;
  }
  if (activated.length > 0 && (plan.listenGiven || plan.run !== undefined)) {
    throw new CliError(
      'socket activation (LISTEN_FDS) passed the listening sockets: --listen, --socket, -U, -p, -i and --run cannot be used with it',
      { hint: 'Say where to listen in the .socket unit instead (contrib/ubcache.socket).' },
    );
  }
  const notifier = notifierFromEnv();
  // --- End of service inputs ---
  const bounds = stopBounds(plan.stopTimeoutMs);
  const paths: DevicePaths = new WeakMap();
  const registry = new Registry({
    ...configure(plan, paths),
    open: async (path) => {
      const dev = await openBlockDevice(path, { exclusive: true });
      paths.set(dev, path);
      return dev;
    },
    deviceStopTimeoutMs: bounds.registry,
    deviceOptions: { stopTimeoutMs: bounds.device },
    setOptions: { stopTimeoutMs: bounds.set },
  });
  const tree = new SysfsTree(registry, {
    daemonFiles: [
      [
        'shutdown',
        wo((text) => {
          if (text.trim() !== '1') {
            throw new SysfsError('EINVAL', 'shutdown: write 1 to stop the daemon (as SIGTERM does)');
          }
          // After this write is answered: the shutdown closes the control socket last.
          setImmediate(() => {
            shutdown('shutdown requested on the control socket: shutting down (finishing requests in flight)');
          });
        }),
      ],
    ],
  });
  const server = new NbdServer([], {
    ownsDevices: false,
    allowEmpty: true,
    shutdownTimeoutMs: plan.shutdownTimeoutMs,
    ...(tls ? { tls } : {}),
  });
  const control = new ControlServer({ tree, stats: () => collectStats(registry, server.exports) });
  const stopped = deferred();
  // An object, not a boolean: the compiler cannot see the handlers change it between awaits.
  const state: { requested: boolean; serving: boolean; status: number; captive?: Captive } = {
    requested: false,
    serving: false,
    status: 0,
  };
  const requested = (): boolean => state.requested;
  // --- Service: -U - (a private socket directory, removed at exit), status updates ---
  const privateDir = plan.privateSocket ? mkdtempSync(join(tmpdir(), 'ubcache-')) : undefined;
  const listen = privateDir !== undefined ? [...plan.listen, { path: join(privateDir, 'socket') }] : plan.listen;
  let statusTimer: NodeJS.Timeout | undefined;
  const sendStatus = (): void => {
    if (state.serving && !state.requested) notifier?.send(statusMessage(statusLine(registry)));
  };
  let stopWatchingParent: (() => void) | undefined;
  // --- End ---
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
        if (privateDir !== undefined) rmSync(privateDir, { recursive: true, force: true });
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
    if (state.requested) return;
    state.requested = true;
    log.info(why);
    // --- Service: tell systemd, stop watching the parent, end a --run command still running ---
    notifier?.send('STOPPING=1\nSTATUS=shutting down');
    clearInterval(statusTimer);
    stopWatchingParent?.();
    const child = state.captive?.child;
    if (child && child.exitCode === null && child.signalCode === null) {
      // Stopping for another reason (a signal, the control socket): its server is going away.
      log.info('sending SIGTERM to the --run command');
      child.kill('SIGTERM');
    }
    // --- End ---
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
  if (plan.exitWithParent) {
    stopWatchingParent = exitWithParent(() => {
      shutdown('the parent process exited (--exit-with-parent): shutting down');
    });
  }
  const unwatch = registry.watch({
    deviceRunning: (d) => {
      try {
        server.addExport({
          name: d.name,
          description: `${d.name}: ${d.backingName}${d.attachment ? ` cached on set ${d.attachment.cs.uuid}` : ' (no cache)'}`,
          device: d.device,
          // Requests must be sector-aligned; those not aligned to the cache block bypass it.
          blockSize: { min: 512 },
          ...(plan.readOnly ? { readOnly: true } : {}),
        });
        if (state.serving) log.info(`export ${d.name} added (${d.backingName})`);
      } catch (err) {
        log.error(`cannot export ${d.name}: ${errorMessage(err)}`);
      }
      sendStatus();
    },
    deviceStopped: (d) => {
      if (server.exports.some((e) => e.device === d.device)) {
        void server.removeExport(d.name).then(() => {
          log.info(`export ${d.name} removed`);
        });
      }
      lastGone();
      sendStatus();
    },
    setGone: () => {
      lastGone();
      sendStatus();
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
  // Only with --exit-when-idle: otherwise an empty daemon waits for register, as the kernel's module does.
  const lastGone = (): void => {
    if (plan.exitWhenIdle && state.serving && !state.requested && registry.empty) {
      shutdown('no bcache device and no cache set is left: shutting down (--exit-when-idle)');
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
      await registerAll(plan, registry, paths);
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
    // Cache devices alone are something to serve (flash_vol_create makes
    // volumes in them); backing devices that all wait for their cache sets are not.
    if (running.length === 0 && plan.devices.length > 0 && (registry.sets.size === 0 || registry.devices.length > 0)) {
      const hint =
        registry.devices.length === 0
          ? 'Give a backing device too (ubcache make -B), not only a cache device.'
          : 'The backing devices wait for their cache sets: give their cache devices too.';
      if (plan.exitWhenIdle) {
        await stopAll();
        throw new CliError('no bcache device to serve', { hint });
      }
      log.warn(`no bcache device to serve yet (${hint}); waiting for register on the control socket`);
    }
    const exportList = running.length === 0 ? 'none yet' : running.map((d) => d.name).join(', ');
    const bound: ListenTarget[] = [];
    const targets: ListenTarget[] = activated.length > 0 ? activated.map((fd) => ({ fd })) : listen;
    for (const target of targets) {
      let at: ListenTarget;
      try {
        at = await server.listen(target);
      } catch (err) {
        if (requested()) break;
        await stopAll();
        throw new CliError(
          'fd' in target ? `socket activation: fd ${target.fd}: ${errorMessage(err)}` : errorMessage(err),
        );
      }
      bound.push(at);
      log.info(
        // A passed unix socket's path is not known to Node (no getsockname for pipes): it shows as its fd.
        `listening on ${formatAddress(at)}${'fd' in target && !('fd' in at) ? ` (socket activation, fd ${target.fd})` : 'fd' in at ? ' (socket activation)' : ''} (exports: ${exportList})` +
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
    // --- Service: ready (pidfile, systemd), status now and then, the --run command ---
    if (!requested()) {
      if (plan.pidfile !== undefined) {
        try {
          writePidfile(plan.pidfile);
        } catch (err) {
          await stopAll();
          throw new CliError(`cannot write the pidfile ${plan.pidfile}: ${errorMessage(err)}`);
        }
      }
      notifier?.send(`READY=1\n${statusMessage(statusLine(registry))}`);
      if (notifier) {
        statusTimer = setInterval(sendStatus, STATUS_INTERVAL_MS);
        statusTimer.unref();
      }
      if (plan.run !== undefined) {
        const vars = captiveEnv({ listeners: bound, exports: server.exports.map((e) => e.name), tls: plan.tls.mode });
        log.debug(
          `--run: ${plan.run} (${Object.entries(vars)
            .map(([k, val]) => `${k}=${val}`)
            .join(' ')})`,
        );
        const captive = runCaptive(plan.run, vars);
        state.captive = captive;
        void captive.exited.then((status) => {
          // Its status is serve's only if its exit is what stops serve (not our SIGTERM below).
          if (state.requested) return;
          state.status = status;
          shutdown(`the --run command exited with status ${status}: shutting down`);
        });
      }
    }
    // --- End ---
    lastGone();
    await stopped.promise;
    log.info('stopped');
    return state.status;
  } finally {
    clearInterval(statusTimer);
    stopWatchingParent?.();
    unwatch();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
};

/** How often systemd's STATUS= is refreshed (besides at every device change): dirty data and hits move. */
const STATUS_INTERVAL_MS = 10_000;
