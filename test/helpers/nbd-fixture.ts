// An in-process NBD server on a unix socket in a fresh temp directory, for
// protocol tests: the test talks to it with RawNbdClient (or a real client)
// and inspects the device directly.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import type { ExportConfig } from '../../src/nbd/exports.ts';
import { NbdServer, type ServerOptions } from '../../src/nbd/server.ts';
import { RawNbdClient, type HandshakeOptions, type Negotiation, type Target } from './nbd-raw-client.ts';

export interface Fixture {
  server: NbdServer;
  target: Target;
  socketPath: string;
  dir: string;
  /** A connected client that has completed the handshake. */
  open(options?: HandshakeOptions): Promise<{ client: RawNbdClient } & Negotiation>;
  /** A connected client before the greeting has been read. */
  connect(): Promise<RawNbdClient>;
  /** Close the server (if the test did not) and remove the temp directory. */
  cleanup(): Promise<void>;
}

export async function startServer(
  exports: ExportConfig[] = [{ name: 'disk', device: new MemoryBlockDevice(16 * 1024 * 1024) }],
  options: ServerOptions = {},
): Promise<Fixture> {
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-nbd-'));
  const socketPath = join(dir, 'nbd.sock');
  const server = new NbdServer(exports, options);
  await server.listen({ path: socketPath });
  const target = { path: socketPath };
  const clients: RawNbdClient[] = [];
  const track = (c: RawNbdClient): RawNbdClient => {
    clients.push(c);
    return c;
  };
  return {
    server,
    target,
    socketPath,
    dir,
    async open(options) {
      const r = await RawNbdClient.open(target, options);
      track(r.client);
      return r;
    },
    async connect() {
      return track(await RawNbdClient.connect(target));
    },
    async cleanup() {
      for (const c of clients) c.destroy();
      await Promise.all(clients.map((c) => c.closed));
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
