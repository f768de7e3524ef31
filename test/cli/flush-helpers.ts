// Helpers of the flush tests: the command from the source tree, and the
// kernel-written fixtures (test/fixtures/kernel) copied for a flush, with the
// device content the kernel served from them.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { KERNEL_FIXTURES, loadKernelFixture, type KernelFixtureName } from '../helpers/fixtures.ts';
import { ROOT } from '../helpers/daemon.ts';

const S = 512;

/** `ubcache flush ARGS...` from the source tree (the command under test), to completion. */
export function flushCli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'src', 'cli', 'main.ts'), 'flush', ...args], {
    cwd: ROOT,
    encoding: 'utf8',
    timeout: 120_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** The bcache device as the kernel served it: the backing data with every dirty pattern over it. */
export function kernelView(name: KernelFixtureName): Buffer {
  const info = KERNEL_FIXTURES[name];
  const bdev = loadKernelFixture(name).bdev;
  assert.ok(bdev);
  const view = Buffer.from(bdev.subarray((info.dataOffset ?? 16) * S));
  for (const p of info.patterns) view.fill(p.byte, p.sector * S, (p.sector + p.sectors) * S);
  return view;
}

/** Copies of a fixture's images in `dir`. */
export function fixtureImages(dir: string, name: KernelFixtureName): { cache: string; bdev: string } {
  const { cache, bdev } = loadKernelFixture(name);
  assert.ok(bdev);
  mkdirSync(dir, { recursive: true });
  const paths = { cache: join(dir, `${name}-cache.img`), bdev: join(dir, `${name}-bdev.img`) };
  writeFileSync(paths.cache, cache);
  writeFileSync(paths.bdev, bdev);
  return paths;
}
