// Image files for CLI tests: made in a temp dir, removed at the end.

import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export class ImageDir {
  readonly dir: string;
  constructor(prefix = 'ubcache-img-') {
    this.dir = mkdtempSync(join(tmpdir(), prefix));
  }
  /** A sparse zero-filled file of `bytes`. */
  zeroed(name: string, bytes: number): string {
    const path = join(this.dir, name);
    const fd = openSync(path, 'w');
    ftruncateSync(fd, bytes);
    closeSync(fd);
    return path;
  }
  /** A file holding exactly `content`. */
  file(name: string, content: Buffer): string {
    const path = join(this.dir, name);
    writeFileSync(path, content);
    return path;
  }
  path(name: string): string {
    return join(this.dir, name);
  }
  remove(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

export function hasTool(name: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${name}`]).status === 0;
}

export interface ToolResult {
  status: number;
  stdout: string;
  stderr: string;
}

export function runTool(cmd: string, args: string[], input?: string): ToolResult {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}
