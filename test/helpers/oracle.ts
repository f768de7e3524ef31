// The kernel oracle from tests: boot Debian's stock kernel with its bcache
// driver in a small VM (scripts/linux-bcache) over disk images, run a shell
// script there, and get its output and exit status.
//
// Each boot costs 10-20 s, so put several scenarios in one script. Inside
// the VM the images are /dev/vda, /dev/vdb, ... in the order given and the
// tools are busybox's.
//
//   const skip = oracleSkipReason();
//   test('...', { skip }, async () => { const r = await runOracle(script, [a, b]); ... });

import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Where the oracle runner is: $UBCACHE_ORACLE, else the repository's scripts/linux-bcache. */
export function oraclePath(): string {
  return process.env['UBCACHE_ORACLE'] ?? join(repoRoot, 'scripts', 'linux-bcache');
}

/** Why oracle tests cannot run here, or false when they can (for node:test's `skip`). */
export function oracleSkipReason(): string | false {
  if (process.platform !== 'linux') return 'the kernel oracle needs Linux';
  const runner = oraclePath();
  if (!existsSync(runner)) return `the kernel oracle is not at ${runner} (set UBCACHE_ORACLE)`;
  // The runner knows its cache directory and what it needs (qemu, busybox,
  // the kernel): ask it rather than duplicate that here.
  const status = spawnSync(runner, ['status'], { encoding: 'utf8' });
  if (status.error !== undefined) return `the kernel oracle cannot start: ${status.error.message}`;
  if (status.status !== 0) {
    const why = `${status.stdout}${status.stderr}`.trim() || `status exited ${String(status.status)}`;
    return `the kernel oracle is not ready: ${why}`;
  }
  return false;
}

export interface OracleResult {
  /** The script's exit status (124 if the VM did not finish). */
  status: number;
  /** What the script printed (stdout and stderr, merged by the VM console). */
  output: string;
  /** The oracle's own complaints (timeouts, qemu errors). */
  stderr: string;
}

/** Run `script` in the VM over `disks` (image paths, used in place and changed by the script). */
export async function runOracle(
  script: string,
  disks: string[],
  options: { timeoutSec?: number } = {},
): Promise<OracleResult> {
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-oracle-'));
  try {
    const scriptPath = join(dir, 'script.sh');
    writeFileSync(scriptPath, script);
    const args = ['run', '--timeout', String(options.timeoutSec ?? 240), '--script', scriptPath, ...disks];
    return await new Promise<OracleResult>((resolve, reject) => {
      const child = spawn(oraclePath(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
      let output = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (output += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      child.on('error', reject);
      child.on('close', (code) => {
        resolve({ status: code ?? 1, output, stderr });
      });
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Lines "KEY value..." printed by a script, as a map (the last one wins). */
export function oracleFacts(output: string): Map<string, string> {
  const facts = new Map<string, string>();
  for (const line of output.split('\n')) {
    const m = /^([A-Za-z0-9_.-]+)=(.*)$/.exec(line.trim());
    if (m?.[1] !== undefined && m[2] !== undefined) facts.set(m[1], m[2]);
  }
  return facts;
}

/** Shell functions for oracle scripts: waiting for sysfs paths without unbounded loops. */
export const ORACLE_SH_PRELUDE = `
waitfor() { i=0; while [ ! -e "$1" ]; do i=$((i+1)); [ $i -gt 200 ] && { echo "timeout waiting for $1"; return 1; }; sleep 0.05; done; }
waitgone() { i=0; while [ -e "$1" ]; do i=$((i+1)); [ $i -gt 200 ] && { echo "timeout waiting for $1 to go"; return 1; }; sleep 0.05; done; }
pattern() { tr '\\000' "\\\\$1" </dev/zero; }
`;
