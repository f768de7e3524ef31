// Running `ubcache serve` as a real process for end-to-end tests: images made
// with `ubcache make`, the daemon started on a unix socket (waiting for its
// "listening on" line), and a small NBD client for reads, writes and flushes.

import { join } from 'node:path';
import { Cmd, CmdFlag } from '../../src/nbd/protocol.ts';
import assert from 'node:assert/strict';
import { Daemon, run, sparseFile, ubcache } from '../helpers/daemon.ts';
import { attachLoop } from '../helpers/fuse-loop.ts';
import { RawNbdClient } from '../helpers/nbd-raw-client.ts';

export const MiB = 1024 * 1024;

export interface Images {
  cache: string;
  backing: string;
}

/** A cache and a backing image formatted together (make-bcache -C ... -B ...). */
export function makeImages(dir: string, o: { cacheMiB?: number; backingMiB?: number; args?: string[] } = {}): Images {
  const cache = sparseFile(join(dir, 'cache.img'), (o.cacheMiB ?? 64) * MiB);
  const backing = sparseFile(join(dir, 'backing.img'), (o.backingMiB ?? 64) * MiB);
  const r = ubcache(['make', '-b', '64k', ...(o.args ?? []), '-C', cache, '-B', backing]);
  if (r.status !== 0) throw new Error(`ubcache make failed:\n${r.stderr}`);
  return { cache, backing };
}

export interface ServeDaemon {
  daemon: Daemon;
  socket: string;
  uri: (name?: string) => string;
}

/** Start `ubcache serve --socket DIR/serve.sock ARGS...` and wait until it listens. */
export async function startServe(dir: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<ServeDaemon> {
  const socket = join(dir, 'serve.sock');
  const daemon = new Daemon(['serve', '--socket', socket, ...args], env);
  await daemon.waitForLine(/listening on unix:/);
  return {
    daemon,
    socket,
    uri: (name = 'bcache0') => `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`,
  };
}

/**
 * One round of ext4 on a served bcache device: `s`'s bcache0 through nbdfuse
 * + loop with 4 KiB sectors (the cache's block size: smaller writes would
 * bypass it, as in the kernel), `work` on it, then unmounted and checked with
 * fsck (the filesystem's label is `label`), and serve stopped. Everything is
 * undone on failure too.
 */
export async function ext4Round(
  dir: string,
  s: ServeDaemon,
  label: string,
  work: (mnt: string, loop: string) => Promise<void>,
): Promise<void> {
  try {
    const stack = await attachLoop(dir, s.uri(), { sectorSize: 4096 });
    try {
      await work(stack.mnt, stack.loop);
      await stack.umount().catch(() => undefined);
      assert.match(await run('fsck.ext4', ['-f', '-n', stack.loop]), new RegExp(`${label}: \\d+/\\d+ files`));
    } finally {
      await stack.teardown();
    }
  } finally {
    await s.daemon.stop().finally(() => s.daemon.kill());
  }
}

/** An NBD connection to one export, with errors turned into exceptions. */
export class Client {
  readonly raw: RawNbdClient;
  readonly size: number;
  private constructor(raw: RawNbdClient, size: number) {
    this.raw = raw;
    this.size = size;
  }

  static async connect(socket: string, name = 'bcache0'): Promise<Client> {
    const { client, size } = await RawNbdClient.open({ path: socket }, { name });
    return new Client(client, size);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const r = await this.raw.readAt(offset, length);
    if (r.error !== 0 || !r.data) throw new Error(`read ${offset}+${length}: NBD error ${r.error} ${r.message}`);
    return r.data;
  }

  async write(offset: number, data: Buffer, fua = false): Promise<void> {
    const r = await this.raw.writeAt(offset, data, fua ? CmdFlag.FUA : 0);
    if (r.error !== 0) throw new Error(`write ${offset}+${data.length}: NBD error ${r.error} ${r.message}`);
  }

  async flush(): Promise<void> {
    const r = await this.raw.request({ type: Cmd.FLUSH, offset: 0, length: 0, flags: 0 });
    if (r.error !== 0) throw new Error(`flush: NBD error ${r.error} ${r.message}`);
  }

  close(): void {
    this.raw.disconnect();
  }
}
