#!/usr/bin/env node
// The test command (`npm test`): build, typecheck, lint, then every test file
// under test/ with node's built-in runner (through tsx, since Node 20 cannot
// strip types) with V8 coverage (reported by c8). Prints one closing line
// "N passed, N failed, N skipped".
//
// The suites whose I/O goes through the I/O engine (test/blockdev,
// test/crash, and those of test/bcache that use files) run twice: with the
// default engine (io_uring where the kernel allows it) and again with
// UBCACHE_IO_ENGINE=threadpool, the fallback, so both stay correct; the
// closing line counts both runs. --one-engine skips the second run (so does
// setting UBCACHE_IO_ENGINE yourself: then one run, on your engine).
//
//   node scripts/test.mjs [--no-checks] [--only unit|e2e|oracle|crash] [--no-coverage] [--one-engine] [FILE...]
//
// Tests that need a tool the machine lacks (qemu, nbdkit, /dev/fuse, ...) skip
// themselves and say why; .ci/run installs everything, so in CI they all run.
import { spawn, spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, statSync, existsSync, rmSync } from 'node:fs';
import { join, relative, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const noChecks = args.includes('--no-checks');
const noCoverage = args.includes('--no-coverage');
const oneEngine = args.includes('--one-engine') || process.env.UBCACHE_IO_ENGINE !== undefined;
const onlyIdx = args.indexOf('--only');
const only = onlyIdx >= 0 ? args[onlyIdx + 1] : undefined;
const explicit = args.filter((a, i) => !a.startsWith('--') && args[i - 1] !== '--only');

function step(name, cmd, cmdArgs) {
  const t0 = Date.now();
  const r = spawnSync(cmd, cmdArgs, { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) {
    console.error(`\n${name} failed`);
    console.log('0 passed, 1 failed, 0 skipped');
    process.exit(1);
  }
  console.error(`${name}: ok (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
}

if (!noChecks) {
  step('build', process.execPath, ['scripts/build.mjs', '--quiet']);
  step('typecheck', process.execPath, [
    join(root, 'node_modules/typescript/bin/tsc'),
    '-p',
    'tsconfig.json',
    '--noEmit',
  ]);
  step('lint', process.execPath, [join(root, 'node_modules/eslint/bin/eslint.js'), '--max-warnings', '0', '.']);
}

function walk(dir) {
  if (!existsSync(dir)) return [];
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...walk(p));
    else if (name.endsWith('.test.ts')) out.push(p);
  }
  return out;
}

const category = (file) => {
  const rel = relative(join(root, 'test'), file).split('/')[0];
  return ['e2e', 'oracle', 'crash'].includes(rel) ? rel : 'unit';
};

let files = explicit.length > 0 ? explicit.map((f) => join(root, f)) : walk(join(root, 'test'));
if (only) files = files.filter((f) => category(f) === only);
if (files.length === 0) {
  console.error('no test files found');
  process.exit(1);
}

/**
 * The files that run a second time, on the thread-pool engine: the
 * BlockDevice suites and the crash suites (which run `ubcache serve`) all,
 * and of the engine's suites those that reach the I/O engine, i.e. open a
 * file device or run the daemon. The others build on memory devices, so a
 * second run would prove nothing about the engine and cost a minute.
 */
const enginePass = (file) => {
  const rel = relative(root, file);
  if (/^test\/(blockdev|crash)\/[^/]+\.test\.ts$/.test(rel)) return true;
  if (!/^test\/bcache\/[^/]+\.test\.ts$/.test(rel)) return false;
  return /\b(FileBlockDevice|openBlockDevice|Daemon)\b/.test(readFileSync(file, 'utf8'));
};

const nodeArgs = (list) => [
  '--import',
  'tsx',
  '--expose-gc',
  '--test',
  '--test-reporter=spec',
  `--test-concurrency=${process.env.UBCACHE_TEST_CONCURRENCY ?? '3'}`,
  '--test-timeout=600000',
  ...list.map((f) => relative(root, f)),
];

// Coverage: every test process writes V8 coverage into one directory over
// both runs (what c8 does when it wraps a command); one report at the end.
const coverageDir = join(root, 'coverage', 'tmp');
if (!noCoverage) rmSync(coverageDir, { recursive: true, force: true });

/** One `node --test` run over `list`; resolves with its exit code and counts. */
function runTests(label, list, env) {
  const t0 = Date.now();
  const childEnv = { ...process.env, ...env };
  if (!noCoverage) childEnv.NODE_V8_COVERAGE = coverageDir;
  const child = spawn(process.execPath, nodeArgs(list), {
    cwd: root,
    stdio: ['ignore', 'pipe', 'inherit'],
    env: childEnv,
  });
  let tail = '';
  child.stdout.on('data', (chunk) => {
    process.stdout.write(chunk);
    tail = (tail + chunk.toString()).slice(-4000);
  });
  return new Promise((resolve) => {
    child.on('close', (code) => {
      const num = (name) => {
        const m = new RegExp(`(?:ℹ|#) ${name} (\\d+)`).exec(tail);
        return m ? Number(m[1]) : 0;
      };
      const counts = { pass: num('pass'), fail: num('fail') + num('cancelled'), skipped: num('skipped') + num('todo') };
      const secs = ((Date.now() - t0) / 1000).toFixed(0);
      console.error(`${label}: ${counts.pass} passed, ${counts.fail} failed, ${counts.skipped} skipped (${secs} s)`);
      resolve({ code, ...counts });
    });
  });
}

const t0 = Date.now();
const firstLabel = process.env.UBCACHE_IO_ENGINE
  ? `UBCACHE_IO_ENGINE=${process.env.UBCACHE_IO_ENGINE}`
  : 'default engine';
const runs = [await runTests(firstLabel, files, {})];
const again = oneEngine ? [] : files.filter(enginePass);
if (again.length > 0) {
  console.error(`\nagain on the thread-pool engine (UBCACHE_IO_ENGINE=threadpool): ${again.length} files\n`);
  // The soak's rounds are its cost (a minute for the default 6); on the second engine 2 rounds show the
  // same paths (kill -9, SIGTERM, restart) at a third of the time.
  const soak = { UBCACHE_SOAK_ROUNDS: process.env.UBCACHE_SOAK_ROUNDS ?? '2' };
  runs.push(await runTests('thread-pool engine', again, { UBCACHE_IO_ENGINE: 'threadpool', ...soak }));
}
if (!noCoverage) {
  spawnSync(
    process.execPath,
    [
      join(root, 'node_modules/c8/bin/c8.js'),
      'report',
      `--temp-directory=${coverageDir}`,
      '--reporter=text-summary',
      '--include=src/**',
      '--exclude=src/cli/main.ts',
    ],
    { cwd: root, stdio: 'inherit' },
  );
}
const sum = (key) => runs.reduce((n, r) => n + r[key], 0);
console.error(`tests took ${((Date.now() - t0) / 1000).toFixed(0)} s`);
console.log(`${sum('pass')} passed, ${sum('fail')} failed, ${sum('skipped')} skipped`);
process.exit(runs.every((r) => r.code === 0) && sum('fail') === 0 ? 0 : 1);
