// `ubcache export`: serve files, block devices or remote NBD exports (a proxy)
// over NBD until told to stop.
// SIGINT or SIGTERM shuts down in order (requests in flight finish, new ones
// get ESHUTDOWN, devices are flushed and closed) and the process then exits by
// itself with status 0; a second signal exits at once.

import { basename } from 'node:path';
import { FaultyBlockDevice } from '../blockdev/faulty.ts';
import { openBlockDevice } from '../blockdev/open.ts';
import { NbdBlockDevice } from '../blockdev/nbd.ts';
import type { BlockDevice } from '../blockdev/types.ts';
import type { BlockSizes } from '../nbd/codec.ts';
import { isNbdUri, parseNbdUri } from '../nbd/uri.ts';
import type { ExportConfig } from '../nbd/exports.ts';
import { formatAddress, NbdServer, type ListenTarget } from '../nbd/server.ts';
import { deferred, errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { CliError, parseCommandArgs, type Subcommand } from './common.ts';
import { loadTls, parseTlsOptions, tlsHelp, TLS_OPTIONS } from './tls-options.ts';
import type { ServerTlsSettings } from '../nbd/server-tls.ts';

export const DEFAULT_LISTEN: ListenTarget = { host: '127.0.0.1', port: 10809 };

const HELP = `Usage: ubcache export [options] FILE...

Serve each FILE (a regular file, a block device, or another server's export
named by its NBD URI, nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)
as an NBD export until SIGINT or SIGTERM.

Options:
  --listen HOST:PORT   listen on TCP; default 127.0.0.1:10809 when no --socket
                       is given. Use 0.0.0.0:PORT or [::]:PORT to listen on all
                       interfaces (without --tls there is no authentication).
                       Repeatable.
  --socket PATH        listen on a unix socket. Repeatable.
  --name NAME          name of the next FILE's export, in order (default: the
                       file's base name; for a URI its export name, or
                       "nbd" if that is empty). Repeatable.
  --description TEXT   description of the next FILE's export, in order.
                       Repeatable.
  --read-only          serve every FILE read-only
  --delay DURATION     add DURATION to every read and write of every FILE
                       (requests still run in parallel): a slow disk for
                       demos and tests. DURATION is a number of seconds, or
                       a number with ms or s (2ms, 0.5s).
${tlsHelp(23)}  -h, --help           show this help

The first FILE is also the default export (the empty name).

Clients:
  nbdinfo nbd://127.0.0.1:10809/NAME
  nbdinfo 'nbd+unix:///NAME?socket=PATH'
`;

export interface ExportPlan {
  files: string[];
  names: string[];
  descriptions: (string | undefined)[];
  readOnly: boolean;
  /** --delay: added to every read and write (ms); absent or 0 for none. */
  delayMs?: number;
  listen: ListenTarget[];
  tls: ServerTlsSettings;
}

const usageHint = "Run 'ubcache export --help' for the options.";

/** Parse HOST:PORT (or [IPv6]:PORT). */
export function parseListen(spec: string): ListenTarget {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d+)$/.exec(spec);
  const host = m?.[1] ?? m?.[2];
  const port = Number(m?.[3]);
  if (!m || host === undefined || !Number.isInteger(port) || port > 65535) {
    throw new CliError(`--listen '${spec}' is not HOST:PORT`, {
      hint: 'Give an address and a port, e.g. --listen 127.0.0.1:10809 or --listen [::1]:10809.',
    });
  }
  return { host, port };
}

/** --delay: seconds, or a number with ms or s; 0 is no delay. */
export function parseDelay(text: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s)?$/.exec(text.trim());
  const n = Number(m?.[1]);
  const ms = m && Number.isFinite(n) ? (m[2] === 'ms' ? n : n * 1000) : NaN;
  if (!Number.isFinite(ms) || ms > 3_600_000) {
    throw new CliError(`--delay '${text}' is not a duration of at most an hour`, {
      hint: 'Write seconds or a number with ms or s, e.g. --delay 2ms or --delay 0.5s.',
    });
  }
  return ms;
}

/** A FILE's export name when --name gives none: the file's base name, or a remote export's own name. */
function defaultName(file: string): string {
  if (!isNbdUri(file)) return basename(file);
  try {
    const name = parseNbdUri(file).exportName;
    return name === '' ? 'nbd' : name;
  } catch (err) {
    throw new CliError(errorMessage(err), {
      hint: 'Write a remote export as nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH.',
    });
  }
}

/** Turn the arguments into a plan, or 'help'. Throws CliError on anything wrong. */
export function parseExportArgs(args: string[]): ExportPlan | 'help' {
  const parsed = parseCommandArgs(
    args,
    {
      listen: { type: 'string', multiple: true },
      socket: { type: 'string', multiple: true },
      name: { type: 'string', multiple: true },
      description: { type: 'string', multiple: true },
      'read-only': { type: 'boolean' },
      delay: { type: 'string' },
      ...TLS_OPTIONS,
      help: { type: 'boolean', short: 'h' },
    },
    usageHint,
  );
  const v = parsed.values;
  if (v.help === true) return 'help';
  const files = parsed.positionals;
  if (files.length === 0) {
    throw new CliError('no FILE to export', {
      hint: 'Name at least one file or block device, e.g. ubcache export disk.img',
    });
  }
  const givenNames = v.name ?? [];
  const descriptions = v.description ?? [];
  if (givenNames.length > files.length) {
    throw new CliError(`${givenNames.length} --name options for ${files.length} FILE(s)`, {
      hint: 'Each --name names the next FILE in order; give at most one per FILE.',
    });
  }
  if (descriptions.length > files.length) {
    throw new CliError(`${descriptions.length} --description options for ${files.length} FILE(s)`, {
      hint: 'Each --description describes the next FILE in order; give at most one per FILE.',
    });
  }
  const names = files.map((f, i) => givenNames[i] ?? defaultName(f));
  const seen = new Map<string, string>();
  names.forEach((n, i) => {
    const file = files[i] ?? '';
    const other = seen.get(n);
    if (other !== undefined) {
      throw new CliError(`two exports would be named '${n}' (${other} and ${file})`, {
        hint: 'Give them distinct names with --name, one per FILE in order.',
      });
    }
    seen.set(n, file);
  });
  const sockets = (v.socket ?? []).map((path): ListenTarget => {
    if (path === '') throw new CliError('--socket needs a path', { hint: usageHint });
    return { path };
  });
  const tcp = (v.listen ?? []).map(parseListen);
  const listen = tcp.length === 0 && sockets.length === 0 ? [DEFAULT_LISTEN] : [...tcp, ...sockets];
  return {
    files,
    names,
    descriptions: files.map((_, i) => descriptions[i]),
    readOnly: v['read-only'] === true,
    ...(v.delay === undefined ? {} : { delayMs: parseDelay(v.delay) }),
    listen,
    tls: parseTlsOptions(v, usageHint),
  };
}

/**
 * A proxied export passes on the constraints of the server behind it, so
 * clients align to what that server takes; without any, the defaults hold.
 */
function upstreamBlockSize(device: NbdBlockDevice): BlockSizes | undefined {
  const up = device.client.info.advertisedBlockSize;
  if (!up) return undefined;
  const min = up.min;
  const preferred = Math.max(min, 512, (up.preferred & (up.preferred - 1)) === 0 ? up.preferred : 4096);
  return { min, preferred, max: Math.max(preferred, device.client.maxPayload) };
}

async function openAll(plan: ExportPlan): Promise<ExportConfig[]> {
  const configs: ExportConfig[] = [];
  const opened: BlockDevice[] = [];
  const delayMs = plan.delayMs ?? 0;
  try {
    for (const [i, file] of plan.files.entries()) {
      const inner = await openBlockDevice(file, { readOnly: plan.readOnly, exclusive: true });
      const device =
        delayMs > 0
          ? new FaultyBlockDevice(inner, {
              name: inner.name,
              rules: [{ action: { kind: 'latency', ms: delayMs }, ops: ['read', 'write'] }],
            })
          : inner;
      opened.push(device);
      const description = plan.descriptions[i];
      const blockSize = inner instanceof NbdBlockDevice ? upstreamBlockSize(inner) : undefined;
      configs.push({
        name: plan.names[i] ?? file,
        device,
        readOnly: plan.readOnly,
        ...(description !== undefined ? { description } : {}),
        ...(blockSize ? { blockSize } : {}),
      });
    }
    return configs;
  } catch (err) {
    for (const d of opened) await d.close().catch(() => undefined);
    throw new CliError(errorMessage(err));
  }
}

export const run: Subcommand = async (args) => {
  const plan = parseExportArgs(args);
  if (plan === 'help') {
    process.stdout.write(HELP);
    return 0;
  }
  const tls = loadTls(plan.tls);
  const configs = await openAll(plan);
  let server: NbdServer;
  try {
    server = new NbdServer(configs, tls ? { tls } : {});
  } catch (err) {
    for (const c of configs) await c.device.close().catch(() => undefined);
    throw new CliError(errorMessage(err));
  }

  // Signals first, so a signal during startup still shuts down in order.
  const stopped = deferred();
  // An object, not a boolean: the compiler cannot see the handler change it between awaits.
  const shutdown = { requested: false };
  const onSignal = (signal: NodeJS.Signals): void => {
    if (shutdown.requested) {
      log.error(`${signal} again: exiting at once; requests in flight are abandoned`);
      process.exit(signal === 'SIGINT' ? 130 : 143);
    }
    shutdown.requested = true;
    log.info(`${signal}: shutting down (finishing requests in flight; send it again to exit at once)`);
    server.close().then(
      () => {
        stopped.resolve();
      },
      (err: unknown) => {
        stopped.reject(err);
      },
    );
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    const exportList = plan.names.join(', ');
    for (const target of plan.listen) {
      let bound: ListenTarget;
      try {
        bound = await server.listen(target);
      } catch (err) {
        if (shutdown.requested) break; // shutting down already: not a failure
        await server.close();
        throw new CliError(errorMessage(err));
      }
      log.info(
        `listening on ${formatAddress(bound)} (exports: ${exportList})` +
          (tls ? `; TLS ${tls.required ? 'required' : 'offered'}: ${tls.describe}` : '') +
          ((plan.delayMs ?? 0) > 0 ? `; every read and write delayed by ${plan.delayMs ?? 0} ms` : ''),
      );
      if (shutdown.requested) break;
    }
    await stopped.promise;
    log.info('stopped');
    return 0;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
};
