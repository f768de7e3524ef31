// Shared fixtures for the blockdev tests: temp directories that clean up after
// themselves, deterministic data patterns, loop devices.

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** A fresh temp directory; remove() deletes it and everything in it. */
export function tempDir(prefix = 'ubcache-blockdev-'): { dir: string; path(name: string): string; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return {
    dir,
    path: (name) => join(dir, name),
    remove: () => {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** `length` bytes that depend on `seed` and on the position, so misplaced data is caught. */
export function pattern(length: number, seed: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761 + 1) >>> 0;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    buf[i] = (x >>> 16) & 0xff;
  }
  return buf;
}

/** A sparse file of `size` bytes. */
export function sparseFile(path: string, size: number): string {
  writeFileSync(path, '');
  execFileSync('truncate', ['-s', String(size), path]);
  return path;
}

/** Why loop devices cannot be used here, or undefined if they can. */
export function loopUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'loop devices need root';
  const r = spawnSync('losetup', ['--version']);
  if (r.status !== 0) return 'losetup (util-linux) is not installed';
  return undefined;
}

/** Attach `file` to a free loop device; returns its path. */
export function attachLoop(file: string, extra: string[] = []): string {
  return execFileSync('losetup', ['--find', '--show', ...extra, file], { encoding: 'utf8' }).trim();
}

export function detachLoop(dev: string): void {
  spawnSync('losetup', ['-d', dev]);
}

export function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8' });
}
