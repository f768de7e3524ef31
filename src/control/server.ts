// The control socket: the attribute tree over HTTP on a unix socket (mode
// 0600: whoever may use it may reconfigure and stop devices).
//
//   GET /sys/PATH          a file's value, or a directory's names, one a line
//   PUT|POST /sys/PATH     write the body (at most 4096 bytes, as sysfs) to a file
//   GET /json[/sys/PATH]   the tree (or a subtree) as JSON
//   GET /metrics           Prometheus text format
//   GET /api/stats         the same figures as JSON, with the recent warnings and errors
//   GET /                  the live dashboard (dashboard.ts), which reads /api/stats
//
// Errors are JSON {"error": "EINVAL", "message": "..."} with a status that
// fits the errno; a bad request never affects the daemon. An optional
// second listener on TCP (serve --http, loopback by default) serves the
// read-only part: /metrics, /api/stats and the dashboard, never /sys or /json.
//
// A body larger than a store takes is answered 413 as soon as that is known,
// and the rest of it is then read and dropped (up to MAX_DISCARD_BYTES) with
// the connection kept open, as HTTP servers do (RFC 9112 §9.6, nginx's
// lingering close): closing at once, with the client still sending, resets
// the connection, and the client gets EPIPE or ECONNRESET instead of the
// answer it was sent.

import { chmodSync, existsSync, mkdirSync, unlinkSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { dirname } from 'node:path';
import { SysfsError, type Errno } from '../bcache/sysfs/node.ts';
import { MAX_STORE_BYTES, type SysfsTree } from '../bcache/sysfs/tree.ts';
import { errorCode } from '../blockdev/types.ts';
import { isStaleSocket } from '../nbd/server.ts';
import { errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { DASHBOARD_CSP, dashboardAsset, type DashboardStats } from './dashboard.ts';
import { formatMetrics } from './metrics.ts';
import { RecentLog } from './recent-log.ts';
import type { StatsSnapshot } from './stats.ts';

const STATUS: Record<Errno, number> = {
  EINVAL: 400,
  ENOTDIR: 400,
  EISDIR: 400,
  EACCES: 403,
  EPERM: 403,
  ENOENT: 404,
  EBUSY: 409,
  EIO: 500,
};

const LOOPBACK = new Set(['127.0.0.1', '::1', 'localhost']);

export interface ControlServerOptions {
  tree: SysfsTree;
  /** The figures /metrics and /api/stats report, taken at each request. */
  stats: () => StatsSnapshot;
}

class HttpError extends Error {
  readonly status: number;
  readonly code: string;
  readonly headers: Record<string, string>;
  constructor(status: number, code: string, message: string, headers: Record<string, string> = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.headers = headers;
  }
}

export class ControlServer {
  private readonly tree: SysfsTree;
  private readonly stats: () => StatsSnapshot;
  /** Warnings and errors logged since the server was made, for /api/stats. */
  readonly recentLog = new RecentLog();
  private readonly servers: Server[] = [];
  private socketPath: string | undefined;
  private closing: Promise<void> | undefined;

  constructor(options: ControlServerOptions) {
    this.tree = options.tree;
    this.stats = options.stats;
    this.recentLog.start();
  }

  /** Listen on the unix socket at `path` (mode 0600). A stale socket of a dead daemon is replaced. */
  async listen(path: string): Promise<void> {
    const parent = dirname(path);
    if (!existsSync(parent)) {
      try {
        mkdirSync(parent, { recursive: true, mode: 0o700 });
      } catch (err) {
        throw new Error(
          `cannot create ${parent} for the control socket: ${errorMessage(err)}; pick another --control PATH`,
          {
            cause: err,
          },
        );
      }
    }
    let server = this.newServer(false);
    try {
      await listenOn(server, path);
    } catch (err) {
      server.close();
      if (errorCode(err) !== 'EADDRINUSE' || !(await isStaleSocket(path))) {
        throw new Error(
          errorCode(err) === 'EADDRINUSE'
            ? `cannot use control socket ${path}: another ubcache serve is using it (or the path is not a socket); stop that daemon or pass --control with another path`
            : `cannot listen on control socket ${path}: ${errorMessage(err)}; pick another --control PATH`,
          { cause: err },
        );
      }
      log.info(`removing stale control socket ${path} left by a daemon that is gone`);
      unlinkSync(path);
      server = this.newServer(false);
      await listenOn(server, path).catch((e: unknown) => {
        server.close();
        throw new Error(`cannot listen on control socket ${path}: ${errorMessage(e)}; pick another --control PATH`, {
          cause: e,
        });
      });
    }
    chmodSync(path, 0o600);
    this.socketPath = path;
    this.servers.push(server);
  }

  /**
   * Serve /metrics, /api/stats and the dashboard on TCP. Resolves with the
   * bound address. Off loopback it warns: there is no authentication.
   */
  async listenHttp(host: string, port: number): Promise<{ host: string; port: number }> {
    const server = this.newServer(true);
    try {
      await listenOn(server, port, host);
    } catch (err) {
      server.close();
      throw new Error(`cannot listen for HTTP on ${host}:${port}: ${errorMessage(err)}`, { cause: err });
    }
    this.servers.push(server);
    if (!LOOPBACK.has(host)) {
      log.warn(
        `the dashboard and /metrics on ${host}:${port} have no authentication: whoever reaches it sees the devices, their paths and the recent errors`,
      );
    }
    const a = server.address() as AddressInfo;
    return { host: a.address, port: a.port };
  }

  /** Stop listening, drop open connections, remove the socket file. Idempotent. */
  close(): Promise<void> {
    this.recentLog.stop();
    this.closing ??= (async () => {
      await Promise.all(
        this.servers.map(
          (s) =>
            new Promise<void>((resolve) => {
              s.close(() => {
                resolve();
              });
              s.closeAllConnections();
            }),
        ),
      );
      // The unix listener normally unlinks its socket on close; make sure.
      if (this.socketPath !== undefined && existsSync(this.socketPath)) {
        try {
          unlinkSync(this.socketPath);
        } catch {
          // Gone meanwhile.
        }
      }
    })();
    return this.closing;
  }

  private newServer(readOnly: boolean): Server {
    const server = createServer({ requestTimeout: 30_000, headersTimeout: 10_000 }, (req, res) => {
      this.handle(req, res, readOnly).catch((err: unknown) => {
        log.error(`control: ${req.method ?? '?'} ${req.url ?? '?'}: ${errorMessage(err)}`);
        if (!res.headersSent) reply(res, 500, { error: 'EIO', message: errorMessage(err) });
        else res.destroy();
      });
    });
    server.on('clientError', (_err, socket) => {
      socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
    });
    return server;
  }

  /** `readOnly`: the TCP listener, which serves the figures and the dashboard and nothing that changes anything. */
  private async handle(req: IncomingMessage, res: ServerResponse, readOnly: boolean): Promise<void> {
    try {
      const method = req.method ?? '';
      let pathname: string;
      try {
        pathname = decodeURIComponent(new URL(req.url ?? '/', 'http://control').pathname);
      } catch {
        throw new HttpError(400, 'EINVAL', `bad request path ${req.url ?? ''}: not a valid URL path`);
      }
      if (pathname === '/metrics') {
        allow(method, ['GET']);
        res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' });
        res.end(formatMetrics(this.stats()));
        return;
      }
      if (pathname === '/api/stats') {
        allow(method, ['GET']);
        const body: DashboardStats = { ...this.stats(), recentErrors: this.recentLog.list() };
        reply(res, 200, body, { 'cache-control': 'no-store' });
        return;
      }
      const asset = dashboardAsset(pathname);
      if (asset) {
        allow(method, ['GET']);
        res.writeHead(200, {
          'content-type': asset.type,
          'content-security-policy': DASHBOARD_CSP,
          'x-content-type-options': 'nosniff',
        });
        res.end(asset.body);
        return;
      }
      if (readOnly) {
        throw new HttpError(
          404,
          'ENOENT',
          `no such endpoint ${pathname}; here: / (the dashboard), /api/stats and /metrics`,
        );
      }
      if (pathname === '/json' || pathname.startsWith('/json/')) {
        allow(method, ['GET']);
        reply(res, 200, this.tree.json(pathname.slice('/json'.length) || '/sys'));
        return;
      }
      if (pathname !== '/sys' && !pathname.startsWith('/sys/')) {
        throw new HttpError(
          404,
          'ENOENT',
          `no such endpoint ${pathname}; use /sys/..., /json/sys/..., /metrics, /api/stats or / (the dashboard)`,
        );
      }
      if (method === 'GET') {
        const stat = this.tree.stat(pathname);
        const body =
          stat.kind === 'file'
            ? this.tree.read(pathname)
            : this.tree
                .list(pathname)
                .map((n) => `${n}\n`)
                .join('');
        res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' });
        res.end(body);
        return;
      }
      allow(method, ['GET', 'PUT', 'POST']);
      const value = await readBody(req);
      await this.tree.write(pathname, value);
      res.writeHead(204);
      res.end();
    } catch (err) {
      if (err instanceof HttpError) {
        reply(res, err.status, { error: err.code, message: err.message }, err.headers);
      } else if (err instanceof SysfsError) {
        reply(res, STATUS[err.code], { error: err.code, message: err.message });
      } else {
        throw err;
      }
    }
  }
}

function allow(method: string, methods: string[]): void {
  if (!methods.includes(method)) {
    throw new HttpError(405, 'EINVAL', `method ${method} is not allowed here; use ${methods.join(' or ')}`, {
      allow: methods.join(', '),
    });
  }
}

function reply(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(`${JSON.stringify(body)}\n`);
}

/**
 * A refused body up to this size is read and dropped after the 413, so that
 * the client, still sending it, reads the answer; past it the connection is
 * closed (a client sending that much is not listening).
 */
const MAX_DISCARD_BYTES = 64 * 1024 * 1024;

/** 413 for a body too large; the rest of it is drained (see the header), or, past MAX_DISCARD_BYTES, the connection closed. */
function tooLarge(req: IncomingMessage, message: string, seen: number, declared: number): HttpError {
  if (declared > MAX_DISCARD_BYTES) {
    req.resume();
    return new HttpError(413, 'EINVAL', message, { connection: 'close' });
  }
  let dropped = seen;
  req.on('data', (chunk: Buffer) => {
    dropped += chunk.length;
    // A body without a length (chunked) that goes on and on.
    if (dropped > MAX_DISCARD_BYTES) req.socket.destroy();
  });
  req.resume();
  return new HttpError(413, 'EINVAL', message);
}

/** The request body, refusing more than a sysfs store takes without keeping it. */
function readBody(req: IncomingMessage): Promise<string> {
  const declared = Number(req.headers['content-length'] ?? '0');
  if (declared > MAX_STORE_BYTES) {
    return Promise.reject(
      tooLarge(req, `a value may be at most ${MAX_STORE_BYTES} bytes (got ${declared})`, 0, declared),
    );
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let refused = false;
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size > MAX_STORE_BYTES) {
        refused = true;
        req.off('data', onData);
        reject(tooLarge(req, `a value may be at most ${MAX_STORE_BYTES} bytes`, size, declared));
        return;
      }
      chunks.push(chunk);
    };
    req.on('data', onData);
    req.on('end', () => {
      if (!refused) resolve(Buffer.concat(chunks).toString('utf8'));
    });
    req.on('error', reject);
  });
}

function listenOn(server: Server, where: string | number, host?: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => {
      reject(err);
    };
    server.once('error', onError);
    const done = (): void => {
      server.off('error', onError);
      resolve();
    };
    if (typeof where === 'string') {
      // The socket file is created inside listen(): born 0600, never briefly open to others.
      const old = process.umask(0o177);
      try {
        server.listen(where, done);
      } finally {
        process.umask(old);
      }
    } else {
      server.listen(where, host, done);
    }
  });
}
