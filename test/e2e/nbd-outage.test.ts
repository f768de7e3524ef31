// A remote backing device's server restarted under load, end to end: nbdkit
// serves the backing file, `ubcache serve` caches it over the native client,
// fio writes with verify=crc32c through serve in writethrough and writeback
// mode, and nbdkit is killed (SIGKILL) and started again on the same socket in
// the middle of it. fio must see no error and every block must verify; the
// reconnect shows in /metrics; after a clean stop, the backing file read
// through a fresh daemon holds what fio wrote.

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, rmSync, watch } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { have, sparseFile, tempDir, ubcache } from '../helpers/daemon.ts';
import { startNbdkit, tools, type ChildServer } from '../helpers/nbd-servers.ts';
import { startServe } from './serve-helpers.ts';

const MiB = 1024 * 1024;
const skip = (!tools.nbdkit && 'nbdkit is not installed') || (!have('fio') && 'fio is not installed');

/** Resolves once `file` has at least `n` lines matching `pattern` (watching it; bounded by `ms`). */
function linesAtLeast(file: string, pattern: RegExp, n: number, ms: number): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const count = (): number => {
      try {
        return readFileSync(file, 'utf8')
          .split('\n')
          .filter((l) => pattern.test(l)).length;
      } catch {
        return 0;
      }
    };
    const finish = (err?: Error): void => {
      clearTimeout(timer);
      w.close();
      if (err) reject(err);
      else resolve();
    };
    const w = watch(join(file, '..'), () => {
      if (count() >= n) finish();
    });
    const timer = setTimeout(() => {
      finish(new Error(`${file}: fewer than ${n} lines matching ${pattern} after ${ms} ms`));
    }, ms);
    if (count() >= n) finish();
  });
}

function metrics(controlSocket: string): Promise<string> {
  return new Promise<string>((resolve, reject) => {
    const req = request({ socketPath: controlSocket, path: '/metrics' }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (t: string) => (body += t));
      res.on('end', () => {
        resolve(body);
      });
    });
    req.on('error', reject);
    req.end();
  });
}

/** fio in the background: its exit code and JSON output. */
function fio(args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const child = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (t: string) => (out += t));
    child.stderr.setEncoding('utf8').on('data', (t: string) => (err += t));
    child.on('close', (code) => {
      resolve({ code, out, err });
    });
  });
}

for (const mode of ['writethrough', 'writeback'] as const) {
  test(
    `${mode}: nbdkit killed and restarted under fio verify=crc32c through serve: no error, every block verifies`,
    { skip },
    async (t: TestContext) => {
      using tmp = tempDir();
      const backing = sparseFile(join(tmp.dir, 'backing.img'), 64 * MiB);
      const cache = sparseFile(join(tmp.dir, 'cache.img'), 64 * MiB);
      const log = join(tmp.dir, 'nbdkit.log');
      // The log filter shows the writes reaching the server; the delay keeps requests in flight at the kill.
      const args = ['-t', '16', '--filter=log', '--filter=delay', 'file', backing, 'wdelay=2ms', `logfile=${log}`];
      let srv: ChildServer = await startNbdkit(tmp.dir, args);
      const remote = srv.uri();
      const made = ubcache(['make', '-b', '64k', '-C', cache, '-B', remote]);
      assert.equal(made.status, 0, made.stderr);
      const settings =
        mode === 'writeback'
          ? // Writeback copies to the server all along, so the outage hits it too.
            ['--set', 'bcache0.writeback_percent=0', '--set', 'bcache0.writeback_delay=0']
          : [];
      const s = await startServe(tmp.dir, [
        '--set',
        `bcache0.cache_mode=${mode}`,
        '--set',
        'bcache0.sequential_cutoff=0',
        ...settings,
        cache,
        remote,
      ]);
      try {
        const job = fio([
          '--name=outage',
          '--ioengine=nbd',
          `--uri=${s.uri()}`,
          '--rw=randwrite',
          '--bs=4k',
          '--size=24M',
          '--iodepth=16',
          '--verify=crc32c',
          '--do_verify=1',
          '--verify_fatal=1',
          '--verify_state_save=0',
          '--output-format=json',
          `--directory=${tmp.dir}`,
        ]);
        // Some writes have reached the server: kill it in the middle of the run, and start it again.
        await linesAtLeast(log, / Write id=/, 300, 60_000);
        await srv.kill();
        rmSync(srv.socket, { force: true });
        rmSync(join(tmp.dir, 'nbdkit.pid'), { force: true });
        srv = await startNbdkit(tmp.dir, args);
        const r = await job;
        assert.equal(r.code, 0, `fio failed:\n${r.err}\n${r.out}`);
        const json = JSON.parse(r.out.slice(r.out.indexOf('{'))) as { jobs: { error: number; jobname: string }[] };
        for (const j of json.jobs) assert.equal(j.error, 0, `${j.jobname}: fio reported error ${j.error}`);
        // The figure for the record: how long the restart cost the clients.
        t.diagnostic(await s.daemon.waitForLine(/reconnected after \d+ ms/));
        const m = await metrics(`${s.socket}.control`);
        assert.match(m, /ubcache_backing_reconnects_total\{[^}]*device="bcache0"[^}]*\} [1-9]/);
        assert.match(m, /ubcache_backing_connected\{[^}]*\} 1/);
        assert.match(m, /ubcache_backing_outage_seconds_total\{[^}]*\} (0\.\d*[1-9]|[1-9])/);
        assert.ok(!s.daemon.lines.some((l) => /io_errors|I\/O error/i.test(l)), 'no I/O error was counted');
      } finally {
        await s.daemon.stop().finally(() => s.daemon.kill());
        await srv.stop();
      }
    },
  );
}
