// Captive mode (nbdkit-captive(1)): `serve --run 'CMD'` runs CMD through the
// shell once serve is listening, with the NBD URIs in its environment, and
// serve stops when CMD exits, with CMD's exit status as its own. The
// variables are nbdkit's: $uri and $nbd (the same URI, of the default
// export), $unixsocket, $port, $exportname, $tls; and one more per export,
// $uri_NAME (e.g. $uri_bcache0), since serve has several exports and nbdkit
// one.

import { spawn, type ChildProcess } from 'node:child_process';
import { constants } from 'node:os';
import type { ListenTarget } from '../nbd/server.ts';

export interface CaptiveSetting {
  /** The listeners serve is bound to, in order (socket activation excluded: --run refuses it). */
  listeners: ListenTarget[];
  /** Export names in order; the first is the default export. */
  exports: string[];
  /** --tls: 'off', 'on' or 'require'. */
  tls: 'off' | 'on' | 'require';
}

/** An NBD URI for `name` on a listener, in the form the NBD URI spec prefers. */
export function nbdUri(target: ListenTarget, name: string, tls: boolean): string {
  const path = `/${encodeURIComponent(name)}`;
  if ('path' in target) return `${tls ? 'nbds' : 'nbd'}+unix://${path}?socket=${encodeURI(target.path)}`;
  if ('fd' in target) throw new Error('a passed socket has no address to name');
  const host = target.host.includes(':') ? `[${target.host}]` : target.host;
  return `${tls ? 'nbds' : 'nbd'}://${host}:${target.port}${path}`;
}

/** Shell-safe variable name for an export: $uri_bcache0; other characters become _. */
export function exportVariable(name: string): string {
  return `uri_${name.replace(/[^A-Za-z0-9_]/g, '_')}`;
}

/**
 * The environment CMD runs with. A unix socket is preferred over TCP for
 * $uri, as nbdkit does (private, no port to collide on).
 */
export function captiveEnv(s: CaptiveSetting): Record<string, string> {
  const unix = s.listeners.find((t): t is { path: string } => 'path' in t);
  const tcp = s.listeners.find((t): t is { host: string; port: number } => 'host' in t);
  const main = unix ?? tcp;
  const tls = s.tls !== 'off';
  const exportname = s.exports[0] ?? '';
  const env: Record<string, string> = {
    unixsocket: unix?.path ?? '',
    port: tcp ? String(tcp.port) : '',
    exportname,
  };
  if (tls) env['tls'] = s.tls === 'on' ? '1' : '2';
  if (main) {
    env['uri'] = nbdUri(main, exportname, tls);
    env['nbd'] = env['uri'];
    for (const name of s.exports) env[exportVariable(name)] = nbdUri(main, name, tls);
  }
  return env;
}

export interface Captive {
  readonly child: ChildProcess;
  /** CMD's exit status: its code, or 128 + the signal number if a signal ended it (as the shell reports it). */
  readonly exited: Promise<number>;
}

/** Start CMD with `sh -c`, stdio inherited, the variables added to serve's environment. */
export function runCaptive(command: string, vars: Record<string, string>): Captive {
  const child = spawn('/bin/sh', ['-c', command], { stdio: 'inherit', env: { ...process.env, ...vars } });
  const exited = new Promise<number>((resolve) => {
    child.once('error', () => {
      // sh itself could not start: the shell's own status for "command not found".
      resolve(127);
    });
    child.once('exit', (code, signal) => {
      resolve(code ?? 128 + (signal !== null ? constants.signals[signal] : 0));
    });
  });
  return { child, exited };
}
