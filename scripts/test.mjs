#!/usr/bin/env node
// The test command (`npm test`): build, typecheck, lint, then every test file
// under test/ with node's built-in runner (through tsx, since Node 20 cannot
// strip types) under c8 for coverage. Prints one closing line
// "N passed, N failed, N skipped".
//
//   node scripts/test.mjs [--no-checks] [--only unit|e2e|oracle|crash] [--no-coverage] [FILE...]
//
// Tests that need a tool the machine lacks (qemu, nbdkit, /dev/fuse, ...) skip
// themselves and say why; .ci/run installs everything, so in CI they all run.
import { spawn, spawnSync } from 'node:child_process';
import { readdirSync, statSync, existsSync } from 'node:fs';
import { join, relative, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const noChecks = args.includes('--no-checks');
const noCoverage = args.includes('--no-coverage');
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

const nodeArgs = [
  '--import',
  'tsx',
  '--expose-gc',
  '--test',
  '--test-reporter=spec',
  `--test-concurrency=${process.env.UBCACHE_TEST_CONCURRENCY ?? '3'}`,
  '--test-timeout=600000',
  ...files.map((f) => relative(root, f)),
];
const c8 = join(root, 'node_modules/c8/bin/c8.js');
const [cmd, cmdArgs] = noCoverage
  ? [process.execPath, nodeArgs]
  : [
      process.execPath,
      [c8, '--reporter=text-summary', '--include=src/**', '--exclude=src/cli/main.ts', process.execPath, ...nodeArgs],
    ];

const t0 = Date.now();
const child = spawn(cmd, cmdArgs, { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
let tail = '';
child.stdout.on('data', (chunk) => {
  process.stdout.write(chunk);
  tail = (tail + chunk.toString()).slice(-4000);
});
child.on('close', (code) => {
  const num = (label) => {
    const m = new RegExp(`(?:ℹ|#) ${label} (\\d+)`).exec(tail);
    return m ? Number(m[1]) : 0;
  };
  const pass = num('pass');
  const fail = num('fail') + num('cancelled');
  const skipped = num('skipped') + num('todo');
  console.error(`tests took ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  console.log(`${pass} passed, ${fail} failed, ${skipped} skipped`);
  process.exit(code === 0 && fail === 0 ? 0 : 1);
});
