// Test images: sparse files with random data in some places and holes in
// others, so copies exercise both data and zero/hole handling.

import { randomBytes } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, readFileSync, writeSync } from 'node:fs';

const MiB = 1024 * 1024;

/** A `size`-byte sparse file with random data in the given MiB ranges ([startMiB, lengthMiB] pairs). */
export function patchyImage(path: string, size: number, dataRanges: [number, number][]): string {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (const [start, length] of dataRanges) writeSync(fd, randomBytes(length * MiB), 0, length * MiB, start * MiB);
  } finally {
    closeSync(fd);
  }
  return path;
}

/** Byte-for-byte equality of two files, with the first differing offset on failure. */
export function sameContent(a: string, b: string): { equal: true } | { equal: false; at: number } {
  const x = readFileSync(a);
  const y = readFileSync(b);
  if (x.equals(y)) return { equal: true };
  const n = Math.min(x.length, y.length);
  let at = 0;
  while (at < n && x[at] === y[at]) at++;
  return { equal: false, at };
}
