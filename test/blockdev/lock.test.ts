// Exclusive use of an image file: a regular file has no O_EXCL, so an
// exclusive open takes an advisory flock that a second ubcache honours, in
// this process or another, and that dies with its holder (kill -9 included).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DeviceOpenError, FileBlockDevice } from '../../src/blockdev/file.ts';
import { loadNative } from '../../src/blockdev/native.ts';
import { captureLog } from '../../src/util/log.ts';
import { ImageDir } from '../helpers/images.ts';

const native = loadNative();
const skip = native?.flock ? false : 'the native addon (with flock) is not built';
const root = join(fileURLToPath(import.meta.url), '..', '..', '..');

test('a second exclusive open of an image file is refused while the first holds it', { skip }, async () => {
  const dir = new ImageDir();
  try {
    const path = dir.zeroed('img', 1 << 20);
    const first = await FileBlockDevice.open(path, { exclusive: true });
    await assert.rejects(FileBlockDevice.open(path, { exclusive: true }), (err: unknown) => {
      assert.ok(err instanceof DeviceOpenError);
      assert.equal(err.code, 'EBUSY');
      assert.match(err.message, /in use by another process that locked it/);
      return true;
    });
    // Tools that do not claim the file are not blocked.
    const shared = await FileBlockDevice.open(path);
    await shared.close();
    await first.close();
    const again = await FileBlockDevice.open(path, { exclusive: true });
    await again.close();
  } finally {
    dir.remove();
  }
});

test('the lock dies with its holder: kill -9 frees the image', { skip }, async () => {
  const dir = new ImageDir();
  try {
    const path = dir.zeroed('img', 1 << 20);
    const script = `
      import { FileBlockDevice } from './src/blockdev/file.ts';
      await FileBlockDevice.open(${JSON.stringify(path)}, { exclusive: true });
      process.stdout.write('locked\\n');
      setInterval(() => {}, 1000);
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: root,
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    try {
      const [line] = (await once(child.stdout, 'data')) as [Buffer];
      assert.equal(line.toString().trim(), 'locked');
      await assert.rejects(FileBlockDevice.open(path, { exclusive: true }), { code: 'EBUSY' });
    } finally {
      child.kill('SIGKILL');
      await once(child, 'exit');
    }
    const dev = await FileBlockDevice.open(path, { exclusive: true });
    await dev.close();
  } finally {
    dir.remove();
  }
});

test('without the addon an exclusive open works and warns that it cannot lock', async () => {
  const dir = new ImageDir();
  const cap = captureLog();
  try {
    const path = dir.zeroed('img', 1 << 20);
    const a = await FileBlockDevice.open(path, { exclusive: true, native: null });
    const b = await FileBlockDevice.open(path, { exclusive: true, native: null });
    await a.close();
    await b.close();
  } finally {
    cap.restore();
    dir.remove();
  }
  assert.ok(
    cap.lines.some((l) => l.includes('cannot lock') && l.includes('native addon')),
    cap.lines.join('\n'),
  );
});
