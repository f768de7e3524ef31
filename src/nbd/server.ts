// The NBD server: listeners (TCP and unix sockets), the exports, and one
// Connection per client, which runs the handshake and then hands the socket to
// a Transmission. close() is the orderly shutdown: stop listening, refuse new
// options and requests, let requests in flight finish, close connections, then
// close the devices (which flushes them). It is bounded (DESIGN rule 1): past
// shutdownTimeoutMs the clients left are dropped and not waited for, whatever
// their requests are doing below (those are the devices' to end: their own
// stop is bounded).

import { existsSync, lstatSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import { createConnection, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { errorCode } from '../blockdev/types.ts';
import { settledWithin } from '../util/deadline.ts';
import { errorMessage, sleep } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { resolveExport, type Export, type ExportConfig } from './exports.ts';
import { negotiate, ProtocolViolation, type HandshakeContext } from './handshake.ts';
import { acceptTls, type ServerTls } from './server-tls.ts';
import { ConnectionClosed, SocketReader } from './reader.ts';
import { Transmission, type TransmissionOptions } from './transmission.ts';

export interface ServerOptions extends Partial<TransmissionOptions> {
  /** Close the exported devices when the server closes (default true: the server owns them). */
  ownsDevices?: boolean;
  /**
   * How long close() waits for clients before it drops them (default 30 s): a
   * handshake stalled mid-option, a WRITE whose payload never comes, a
   * request stuck in its device. Also the bound on closing each owned device.
   */
  shutdownTimeoutMs?: number;
  /** How long a client may take from connecting to choosing an export, TLS handshake included (default 10 s). */
  handshakeTimeoutMs?: number;
  /** TLS (server-tls.ts: loadServerTls); without it NBD_OPT_STARTTLS is refused. */
  tls?: ServerTls;
}

/** A TCP address, a unix socket path, or a listening socket passed in by socket activation (its fd). */
export type ListenTarget = { host: string; port: number } | { path: string } | { fd: number };

/** Where a listener ended up: "127.0.0.1:10809", "[::1]:10809" or "unix:/run/x.sock". */
export function formatAddress(target: ListenTarget): string {
  if ('path' in target) return `unix:${target.path}`;
  if ('fd' in target) return `fd ${target.fd}`;
  return target.host.includes(':') ? `[${target.host}]:${target.port}` : `${target.host}:${target.port}`;
}

let nextConnectionId = 1;

class Connection {
  readonly id = nextConnectionId++;
  readonly label: string;
  /** The client's socket; after NBD_OPT_STARTTLS, the TLS socket over it. */
  private socket: Socket;
  private readonly server: NbdServer;
  private readonly options: ServerOptions;
  private reader: SocketReader | undefined;
  private transmission: Transmission | undefined;
  private handshakeIdle = false;
  private cancelled = false;
  /** The export chosen, once in transmission. */
  exportName: string | undefined;
  /** Resolves when the connection has ended: socket closed and no request in flight. */
  readonly done: Promise<void>;
  /** Resolves when the socket has closed (requests may still be running in the device). */
  readonly socketClosed: Promise<void>;

  constructor(socket: Socket, server: NbdServer, options: ServerOptions, peer: string) {
    this.socket = socket;
    this.server = server;
    this.options = options;
    this.label = `connection ${this.id} (${peer})`;
    // A client vanishing is routine; the error is logged, the 'close' that follows ends the connection.
    socket.on('error', (err: Error) => {
      log.debug(`${this.label}: ${err.message}`);
    });
    this.socketClosed = this.closed();
    this.done = this.run().catch((err: unknown) => {
      log.error(`${this.label}: ${errorMessage(err)}`);
      this.socket.destroy();
    });
  }

  private closed(): Promise<void> {
    const socket = this.socket;
    if (socket.destroyed) return Promise.resolve();
    return new Promise((resolve) =>
      socket.once('close', () => {
        resolve();
      }),
    );
  }

  /** End our side and give the client a moment to close its own before dropping it. */
  private async endGracefully(): Promise<void> {
    const closed = this.closed();
    this.socket.end();
    this.socket.resume();
    const grace = new AbortController();
    const outcome = await Promise.race([
      closed.then(() => 'closed' as const),
      sleep(this.options.endGraceMs ?? 2000, grace.signal).then(() => 'timeout' as const),
    ]);
    grace.abort();
    if (outcome === 'timeout') this.socket.destroy();
    await closed;
  }

  private async run(): Promise<void> {
    log.debug(`${this.label}: connected`);
    const reader = new SocketReader(this.socket);
    this.reader = reader;
    // The handshake's reader now: the plain one, or the TLS socket's after NBD_OPT_STARTTLS.
    const current = (): SocketReader => this.reader ?? reader;
    const ctx: HandshakeContext = {
      label: this.label,
      findExport: (name) => this.server.findExport(name),
      exports: () => this.server.exports,
      isShuttingDown: () => this.server.shuttingDown,
      setIdle: (idle) => {
        this.handshakeIdle = idle;
      },
      ...(this.options.tls ? { tls: this.tlsUpgrade(this.options.tls) } : {}),
    };
    // A client gets a bounded time to reach transmission (as qemu-nbd's --handshake-limit), so idle or
    // trickling connections cannot pile up.
    const deadline = new AbortController();
    const limitMs = this.options.handshakeTimeoutMs ?? 10_000;
    void sleep(limitMs, deadline.signal).then((expired) => {
      if (!expired) return;
      log.warn(`${this.label}: no export chosen within ${limitMs} ms; closing the connection`);
      // During the TLS handshake nothing reads: dropping the socket ends it.
      if (this.upgrading) this.socket.destroy();
      current().fail(new ConnectionClosed('handshake timed out'));
    });
    let negotiated;
    try {
      negotiated = await negotiate(this.socket, reader, ctx);
    } catch (err) {
      if (err instanceof ProtocolViolation) log.warn(`${this.label}: ${err.message}; closing the connection`);
      else if (!(err instanceof ConnectionClosed)) log.error(`${this.label}: handshake failed: ${errorMessage(err)}`);
      else if (!this.cancelled) log.debug(`${this.label}: ${err.message} during the handshake`);
      deadline.abort();
      current().detach();
      if (this.cancelled) {
        await this.endGracefully();
      } else {
        this.socket.destroy();
        await this.closed();
      }
      return;
    }
    deadline.abort();
    const handover = current().detach();
    this.reader = undefined;
    if (!negotiated) {
      // ABORT, a refused EXPORT_NAME, or shutdown: say nothing more, let the client close.
      await this.endGracefully();
      return;
    }
    const exp = negotiated.export;
    log.debug(
      `${this.label}: export '${exp.name}'` +
        (negotiated.structuredReplies ? ', structured replies' : '') +
        (negotiated.baseAllocationId !== undefined ? ', base:allocation' : ''),
    );
    const t = new Transmission(this.socket, negotiated, this.label, handover, this.options);
    this.transmission = t;
    this.exportName = exp.name;
    if (this.server.shuttingDown || this.server.findExport(exp.name) !== exp) t.shutdown();
    await t.done;
    log.debug(`${this.label}: closed`);
  }

  private upgrading = false;

  /** The handshake's TLS hook: swap the plain socket and reader for the TLS socket's. */
  private tlsUpgrade(tls: ServerTls): NonNullable<HandshakeContext['tls']> {
    return {
      required: tls.required,
      upgrade: async () => {
        const plain = this.socket;
        // The plain reader lets go of the socket: the TLS layer reads it from now on.
        this.reader?.detach();
        this.reader = undefined;
        this.upgrading = true;
        let secure;
        try {
          secure = await acceptTls(plain, tls);
        } catch (err) {
          log.warn(`${this.label}: TLS handshake failed (${tls.describe}): ${errorMessage(err)}`);
          throw new ConnectionClosed(`TLS handshake failed: ${errorMessage(err)}`, { cause: err });
        } finally {
          this.upgrading = false;
        }
        secure.on('error', (err: Error) => {
          log.debug(`${this.label}: ${err.message}`);
        });
        this.socket = secure;
        const reader = new SocketReader(secure);
        this.reader = reader;
        return { socket: secure, reader };
      },
    };
  }

  /** Begin a graceful shutdown of this connection. */
  shutdown(): void {
    if (this.transmission) {
      this.transmission.shutdown();
    } else if (this.reader && this.handshakeIdle && this.reader.bufferedBytes === 0) {
      // Waiting for an option that has not started to arrive: nothing to finish, hang up now.
      this.cancelled = true;
      this.reader.fail(new ConnectionClosed('the server is shutting down'));
    }
    // Otherwise an option is arriving: it is answered with NBD_REP_ERR_SHUTDOWN and the handshake ends.
  }

  /** Requests of this client being served now. */
  get requestsInFlight(): number {
    return this.transmission?.requestsInFlight ?? 0;
  }

  /** Drop the client now (shutdown timeout). */
  destroy(): void {
    this.socket.destroy();
  }
}

export class NbdServer {
  private readonly exportList: Export[] = [];
  private readonly byName = new Map<string, Export>();
  private readonly options: ServerOptions;
  private readonly listeners: Server[] = [];
  private readonly connections = new Set<Connection>();
  private shuttingDownFlag = false;
  private closing: Promise<void> | undefined;

  /**
   * `configs` may be empty only with `allowEmpty` (exports added later with
   * addExport, as ubcache serve does when bcache devices start running).
   */
  constructor(configs: readonly ExportConfig[], options: ServerOptions & { allowEmpty?: boolean } = {}) {
    if (configs.length === 0 && options.allowEmpty !== true)
      throw new Error('the NBD server needs at least one export');
    for (const c of configs) {
      if (this.byName.has(c.name)) throw new Error(`two exports are named '${c.name}'; export names must be unique`);
      this.addExport(c);
    }
    this.options = options;
  }

  /** The exports, in the order they were added; the first is the default export. */
  get exports(): readonly Export[] {
    return this.exportList;
  }

  /** Serve one more export (a device that started running). Throws if the name is taken. */
  addExport(config: ExportConfig): Export {
    if (this.byName.has(config.name)) {
      throw new Error(`an export named '${config.name}' already exists; export names must be unique`);
    }
    const e = resolveExport(config);
    this.exportList.push(e);
    this.byName.set(e.name, e);
    return e;
  }

  /**
   * Stop serving an export (its device stopped): new clients no longer see
   * it; connected clients have their requests in flight finished, later ones
   * answered with ESHUTDOWN, and are then disconnected cleanly. Resolves when
   * they are gone. The device is not closed: its owner stopped it.
   */
  async removeExport(name: string): Promise<void> {
    const e = this.byName.get(name);
    if (!e) return;
    this.byName.delete(name);
    this.exportList.splice(this.exportList.indexOf(e), 1);
    const users = [...this.connections].filter((c) => c.exportName === name);
    for (const c of users) c.shutdown();
    await Promise.all(users.map((c) => c.done));
  }

  get shuttingDown(): boolean {
    return this.shuttingDownFlag;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** The export named `name`; "" is the default export, the first one. */
  findExport(name: string): Export | undefined {
    return this.byName.get(name) ?? (name === '' ? this.exportList[0] : undefined);
  }

  /**
   * Listen on a TCP address or a unix socket. Resolves with the bound address
   * (port 0 picks a free port). A stale unix socket left by a dead server is
   * replaced; a live one, or any other file at that path, is an error.
   */
  async listen(target: ListenTarget): Promise<ListenTarget> {
    if (this.shuttingDownFlag) throw new Error('the server is shutting down');
    let server: Server;
    try {
      server = await this.listenOnce(target);
    } catch (err) {
      if (!('path' in target) || errorCode(err) !== 'EADDRINUSE' || !(await isStaleSocket(target.path))) {
        throw describeListenError(err, target);
      }
      log.info(`removing stale socket ${target.path} left by a server that is gone`);
      unlinkSync(target.path);
      server = await this.listenOnce(target).catch((e: unknown) => {
        throw describeListenError(e, target);
      });
    }
    this.listeners.push(server);
    if ('path' in target) return target;
    if ('fd' in target) {
      // What a passed TCP socket is bound to, for the log; Node knows no path for a passed unix socket.
      const addr = server.address();
      if (addr !== null && typeof addr === 'object' && typeof addr.port === 'number') {
        return { host: addr.address, port: addr.port };
      }
      return target;
    }
    const addr = server.address() as AddressInfo;
    return { host: addr.address, port: addr.port };
  }

  /** A listening net.Server, or a rejection (with nothing left open). */
  private listenOnce(target: ListenTarget): Promise<Server> {
    const server = createServer({ allowHalfOpen: true }, (socket) => {
      this.accept(socket);
    });
    return new Promise<Server>((resolve, reject) => {
      const onError = (err: Error): void => {
        // A failed listen on a unix socket keeps its handle open until closed.
        server.close();
        reject(err);
      };
      server.once('error', onError);
      const done = (): void => {
        server.off('error', onError);
        resolve(server);
      };
      if ('path' in target) server.listen(target.path, done);
      else if ('fd' in target) server.listen({ fd: target.fd }, done);
      else server.listen(target.port, target.host, done);
    });
  }

  /** Serve an already-connected socket (a listener's connection, or one made elsewhere). */
  serve(socket: Socket, peer = 'socket'): void {
    if (this.shuttingDownFlag) {
      socket.destroy();
      return;
    }
    const conn = new Connection(socket, this, this.options, peer);
    this.connections.add(conn);
    void conn.done.then(() => {
      this.connections.delete(conn);
    });
  }

  private accept(socket: Socket): void {
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort ?? 0}` : 'unix';
    if (socket.remoteAddress) {
      // Requests and replies are small and latency-bound: never let Nagle hold them back.
      socket.setNoDelay(true);
      socket.setKeepAlive(true, 60_000);
    }
    this.serve(socket, peer);
  }

  /**
   * Shut down: stop listening, answer new options with ERR_SHUTDOWN and new
   * requests with ESHUTDOWN, wait for requests in flight, close every
   * connection, then close the devices. Idempotent; every call gets the same
   * promise. Bounded: clients not done within shutdownTimeoutMs are dropped
   * (their sockets destroyed; requests of theirs still running in a device
   * are not waited for), and each device close gets that long too.
   */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    this.shuttingDownFlag = true;
    const listenersClosed = this.listeners.map(
      (s) =>
        new Promise<void>((resolve) => {
          s.close(() => {
            resolve();
          });
        }),
    );
    for (const c of this.connections) c.shutdown();
    const all = (): Promise<unknown> => Promise.all([...this.connections].map((c) => c.done));
    const timeout = new AbortController();
    const inTime = await Promise.race([
      all().then(() => true),
      sleep(this.options.shutdownTimeoutMs ?? 30_000, timeout.signal).then(() => false),
    ]);
    timeout.abort();
    if (!inTime) {
      const dropped = [...this.connections];
      const requests = dropped.reduce((n, c) => n + c.requestsInFlight, 0);
      log.warn(
        `${dropped.length} client(s) did not finish within the shutdown timeout; dropping them` +
          (requests > 0
            ? ` (${requests} request(s) still in flight, stuck below: left to their devices' own stop; never acknowledged)`
            : ''),
      );
      for (const c of dropped) c.destroy();
      // Their sockets, not their `done`: that waits for the requests stuck
      // below, and their replies have nowhere to go any more. A dropped
      // connection ends by itself once its requests do; nothing of it needs
      // the server (its timers go with the socket's close).
      await Promise.all(dropped.map((c) => c.socketClosed));
    }
    await Promise.all(listenersClosed);
    if (this.options.ownsDevices ?? true) {
      const bound = this.options.shutdownTimeoutMs ?? 30_000;
      for (const e of this.exports) {
        // A device's close waits for its I/O in flight, which may be what is stuck: bounded as well.
        const closed = e.device.close().catch((err: unknown) => {
          log.error(`export '${e.name}': closing ${e.device.name} failed: ${errorMessage(err)}`);
        });
        if (!(await settledWithin(closed, bound))) {
          log.warn(`export '${e.name}': closing ${e.device.name}: I/O still in flight after ${bound} ms; going on`);
        }
      }
    }
  }
}

function describeListenError(err: unknown, target: ListenTarget): Error {
  const where = formatAddress(target);
  switch (errorCode(err)) {
    case 'EADDRINUSE':
      return new Error(
        'path' in target
          ? `cannot listen on ${where}: the path is in use (a running server, or a file that is not a socket); pick another --socket path or remove it`
          : `cannot listen on ${where}: the address is in use; stop the other server or pick another port`,
      );
    case 'EACCES':
      // libuv reports a missing directory for a unix socket as EACCES.
      if ('path' in target && !existsSync(dirname(target.path))) {
        return new Error(`cannot listen on ${where}: the directory does not exist; create it first`);
      }
      return new Error(`cannot listen on ${where}: permission denied; pick a path or port you may use`);
    case 'EADDRNOTAVAIL':
    case 'ENOTFOUND':
      return new Error(`cannot listen on ${where}: no such local address; use an address of this machine`);
    case 'ENOENT':
      return new Error(`cannot listen on ${where}: the directory does not exist; create it first`);
    default:
      return new Error(`cannot listen on ${where}: ${errorMessage(err)}`);
  }
}

/** A unix socket file nobody accepts on any more (the server that made it died). */
export async function isStaleSocket(path: string): Promise<boolean> {
  try {
    if (!lstatSync(path).isSocket()) return false;
  } catch {
    return false;
  }
  return new Promise<boolean>((resolve) => {
    let stale = false;
    const probe = createConnection(path);
    probe.once('connect', () => {
      probe.destroy();
    });
    probe.once('error', (err: Error) => {
      stale = errorCode(err) === 'ECONNREFUSED';
    });
    probe.once('close', () => {
      resolve(stale);
    });
  });
}
