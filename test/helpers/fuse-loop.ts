// An NBD export as a Linux block device, the way a user builds it: nbdfuse
// exposes the export as a file, losetup turns that file into /dev/loopN.
// Undo steps run in reverse and tolerate failure, so a failed test leaves no
// mount, loop device or FUSE mount behind.

import { spawn } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { have, run, waitForFile } from './daemon.ts';

/** Why the FUSE + loop + ext4 stack cannot run here, or undefined when it can. */
export function missingFuseLoop(): string | undefined {
  if (process.getuid?.() !== 0) return 'mounting and loop devices need root';
  if (!existsSync('/dev/fuse')) return '/dev/fuse is missing (no FUSE in this kernel or container)';
  if (!existsSync('/dev/loop-control')) return '/dev/loop-control is missing (no loop devices here)';
  for (const cmd of ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'fsck.ext4', 'mount', 'umount']) {
    if (!have(cmd)) return `${cmd} is not installed (apt-get install libnbd-bin fuse3 e2fsprogs util-linux)`;
  }
  return undefined;
}

export interface LoopStack {
  /** /dev/loopN backed by the export. */
  loop: string;
  /** A directory to mount on. */
  mnt: string;
  mount(options?: string[]): Promise<void>;
  umount(): Promise<void>;
  /** Unmount if mounted, detach the loop device, unmount FUSE; safe to call twice. */
  teardown(): Promise<void>;
}

/**
 * nbdfuse + losetup over `uri`; `dir` gets the FUSE mount point and the mount
 * point. `sectorSize` is the loop device's logical block size (losetup
 * --sector-size), e.g. 4096 to match a bcache device with 4 KiB blocks as the
 * kernel's /dev/bcacheN would (smaller writes bypass the cache there).
 */
export async function attachLoop(dir: string, uri: string, o: { sectorSize?: number } = {}): Promise<LoopStack> {
  const fuseDir = join(dir, 'fuse');
  const mnt = join(dir, 'mnt');
  mkdirSync(fuseDir, { recursive: true });
  mkdirSync(mnt, { recursive: true });
  const undo: (() => Promise<unknown>)[] = [];
  const teardown = async (): Promise<void> => {
    while (undo.length > 0)
      await undo
        .pop()?.()
        .catch(() => undefined);
  };
  try {
    // nbdfuse stays in the foreground and writes its pid file once it serves.
    const pidFile = join(dir, 'nbdfuse.pid');
    const fuse = spawn('nbdfuse', ['-P', pidFile, join(fuseDir, 'disk'), uri], { stdio: 'inherit' });
    const fuseExited = new Promise<number | null>((resolve) => fuse.once('exit', resolve));
    undo.push(async () => {
      await run('fusermount3', ['-u', fuseDir]).catch(() => fuse.kill('SIGKILL'));
      return fuseExited;
    });
    await Promise.race([
      waitForFile(pidFile),
      fuseExited.then((code) => {
        throw new Error(`nbdfuse exited with ${code} before it was ready`);
      }),
    ]);
    const sector = o.sectorSize === undefined ? [] : ['--sector-size', String(o.sectorSize)];
    const loop = (await run('losetup', ['--find', '--show', ...sector, join(fuseDir, 'disk')])).trim();
    if (!/^\/dev\/loop\d+$/.test(loop)) throw new Error(`losetup printed ${JSON.stringify(loop)}`);
    undo.push(() => run('losetup', ['-d', loop]));
    let mounted = false;
    undo.push(() => (mounted ? run('umount', [mnt]) : Promise.resolve()));
    return {
      loop,
      mnt,
      mount: async (options = []) => {
        await run('mount', [...options, loop, mnt]);
        mounted = true;
      },
      umount: async () => {
        await run('umount', [mnt]);
        mounted = false;
      },
      teardown,
    };
  } catch (e) {
    await teardown();
    throw e;
  }
}
