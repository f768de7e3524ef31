// The kernel-written images in test/fixtures/kernel (see its README.md):
// made by Debian's make-bcache, then used by Linux 6.1's bcache driver in the
// oracle VM. Tests of the codecs and of the engine read them to prove they
// understand what the kernel wrote.

import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';

export const KERNEL_FIXTURE_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'kernel');

/** Data written through /dev/bcacheN: `sectors` sectors of `byte` from bcache device sector `sector`. */
export interface Pattern {
  sector: number;
  sectors: number;
  byte: number;
}

export interface KernelFixtureInfo {
  setUuid: string;
  /** Cache geometry (sectors). */
  blockSize: number;
  bucketSize: number;
  nbuckets: number;
  /** Backing device data offset in sectors (keys are in backing sectors: device sector + this). */
  dataOffset?: number;
  /** Dirty data written with writeback held off. */
  patterns: Pattern[];
  /** Stopped cleanly (btree nodes written) or reset without stopping (keys only in the journal). */
  stopped: boolean;
}

export type KernelFixtureName = 'fresh' | 'wb-stopped' | 'wb-crash';

const crashLoop: Pattern[] = Array.from({ length: 200 }, (_, i) => ({
  sector: 9000 + 16 * i,
  sectors: 1,
  byte: 0o100,
}));

export const KERNEL_FIXTURES: Record<KernelFixtureName, KernelFixtureInfo> = {
  fresh: {
    setUuid: '11111111-2222-4333-8444-555555555555',
    blockSize: 8,
    bucketSize: 128,
    nbuckets: 1024,
    patterns: [],
    stopped: true,
  },
  'wb-stopped': {
    setUuid: 'aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee',
    blockSize: 8,
    bucketSize: 128,
    nbuckets: 1024,
    dataOffset: 16,
    patterns: [
      { sector: 0, sectors: 8, byte: 0o245 },
      { sector: 2048, sectors: 128, byte: 0o132 },
      { sector: 8000, sectors: 24, byte: 0o001 },
    ],
    stopped: true,
  },
  'wb-crash': {
    setUuid: 'c0c0c0c0-1234-4567-89ab-cdefcdefcdef',
    blockSize: 1,
    bucketSize: 256,
    nbuckets: 768,
    dataOffset: 16,
    patterns: [
      ...crashLoop,
      { sector: 3, sectors: 1, byte: 0o303 },
      { sector: 100, sectors: 7, byte: 0o252 },
      { sector: 8192, sectors: 128, byte: 0o017 },
    ],
    stopped: false,
  },
};

const cache = new Map<string, Buffer>();

function load(file: string): Buffer {
  let b = cache.get(file);
  if (!b) {
    b = gunzipSync(readFileSync(join(KERNEL_FIXTURE_DIR, file)));
    cache.set(file, b);
  }
  return b;
}

/** The images of a fixture, decompressed (cached per process; do not modify them). */
export function loadKernelFixture(name: KernelFixtureName): { cache: Buffer; bdev: Buffer | undefined } {
  return {
    cache: load(`${name}-cache.img.gz`),
    bdev: name === 'fresh' ? undefined : load(`${name}-bdev.img.gz`),
  };
}
