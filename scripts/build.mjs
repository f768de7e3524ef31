#!/usr/bin/env node
// Build: TypeScript (src -> dist) and, optionally, the small native addon
// (native/) that gives us fallocate and SEEK_DATA/SEEK_HOLE. The addon is an
// optimisation: without it discard is a no-op, write-zeroes writes zeroes and
// block status reports everything as data, all of which the NBD spec allows.
//
// With liburing's headers and static library installed (Debian: liburing-dev)
// the addon also gets the io_uring I/O engine (native/uring.c), linked
// statically so it needs no liburing.so at run time; without them it builds
// without it and the thread pool does the I/O. UBCACHE_NO_URING=1 builds
// without it on purpose.
import { spawnSync } from 'node:child_process';
import { existsSync, chmodSync, cpSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const quiet = process.argv.includes('--quiet');

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: quiet ? 'pipe' : 'inherit', ...opts });
  return r;
}

rmSync(join(root, 'dist'), { recursive: true, force: true });
const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
if (!existsSync(tsc)) {
  console.error('build: TypeScript is not installed; run `npm ci` first.');
  process.exit(1);
}
const t = run(process.execPath, [tsc, '-p', 'tsconfig.build.json']);
if (t.status !== 0) {
  if (quiet) process.stderr.write(String(t.stdout) + String(t.stderr));
  console.error('build: tsc failed');
  process.exit(1);
}
chmodSync(join(root, 'bin', 'ubcache'), 0o755);
// The dashboard's page, script and style are served as they are (no bundler):
// next to the compiled dashboard.js module, which reads them from there.
cpSync(join(root, 'src', 'control', 'dashboard'), join(root, 'dist', 'control', 'dashboard'), { recursive: true });

// The native addon. Find node-gyp: npm exports the path of its bundled copy to
// lifecycle scripts; otherwise look next to npm itself.
const candidates = [
  process.env.npm_config_node_gyp,
  join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  '/usr/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js',
].filter((p) => p && existsSync(p));
const gyp = candidates[0];
if (process.env.UBCACHE_NO_NATIVE) {
  console.error('build: UBCACHE_NO_NATIVE set; skipping the native addon');
} else if (!gyp) {
  console.error('build: node-gyp not found; skipping the native addon (discard and fast zeroing disabled)');
} else {
  const args = [gyp, 'rebuild', '--directory', 'native'];
  // Build against the installed headers when they are there, so nothing is downloaded.
  const headers = join(dirname(process.execPath), '..', 'include', 'node', 'node_api.h');
  if (existsSync(headers)) args.push(`--nodedir=${join(dirname(process.execPath), '..')}`);
  const uring = findLiburing();
  // node-gyp hands the arguments after `--` to gyp itself, which takes -D as a variable.
  const withUring = uring.ok ? [...args, '--', '-Dhave_uring=1'] : args;
  let g = run(process.execPath, withUring, { stdio: 'pipe' });
  if (g.status !== 0 && uring.ok) {
    // A liburing that does not link or compile here must not cost us the rest of the addon.
    console.error('build: warning: the native addon did not build with io_uring; building it without.');
    console.error(String(g.stderr).split('\n').slice(-8).join('\n'));
    g = run(process.execPath, args, { stdio: 'pipe' });
  } else if (!uring.ok && !quiet) {
    console.error(`build: ${uring.why}; the addon is built without io_uring (the thread pool does the I/O)`);
  }
  if (g.status !== 0) {
    console.error('build: warning: the native addon did not build; discard and fast zeroing are disabled.');
    console.error(String(g.stderr).split('\n').slice(-8).join('\n'));
  }
}

/** Are liburing's header and static library installed? */
function findLiburing() {
  if (process.env.UBCACHE_NO_URING) return { ok: false, why: 'UBCACHE_NO_URING set' };
  if (!existsSync('/usr/include/liburing.h')) {
    return { ok: false, why: '/usr/include/liburing.h not found (apt-get install liburing-dev)' };
  }
  const r = spawnSync('cc', ['-print-file-name=liburing.a'], { encoding: 'utf8' });
  const lib = r.status === 0 ? r.stdout.trim() : '';
  // cc echoes the bare name back when it cannot find the file.
  if (!lib.startsWith('/') || !existsSync(lib)) {
    return { ok: false, why: 'liburing.a not found (apt-get install liburing-dev)' };
  }
  return { ok: true, why: '' };
}
