// The live dashboard (serve --http): the page in a headless Chromium while
// fio writes and reads through the cache, with no console error, plots that
// gain points and whose values change, a warning the daemon logged shown in
// the recent errors, and a screenshot. Without a browser: the TCP listener
// serves /api/stats with the same figures as /metrics, and nothing that
// changes anything.
//
// The screenshot goes to the test's temp dir; to regenerate the README's copy
// (after a longer run, so the plots have some history):
//   UBCACHE_DASHBOARD_PNG=docs/dashboard.png node --import tsx --test test/e2e/dashboard.test.ts

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { controlRequest } from '../../src/control/client.ts';
import type { DashboardStats } from '../../src/control/dashboard.ts';
import { Browser, findChromium } from '../helpers/cdp.ts';
import { have, tempDir } from '../helpers/daemon.ts';
import { Client, makeImages, startServe, type ServeDaemon } from './serve-helpers.ts';

const chromium = findChromium();
const skipBrowser =
  (chromium === undefined && 'chromium is not installed (apt-get install chromium; .ci/run installs it)') ||
  (!have('fio') && 'fio is not installed (apt-get install fio)');

/** Start serve in writeback mode with --http (or the alias) on a free loopback port; its base URL. */
async function serveWithHttp(
  dir: string,
  option = '--http',
): Promise<{ serve: ServeDaemon; base: string; control: string }> {
  const { cache, backing } = makeImages(dir);
  const serve = await startServe(dir, [option, '127.0.0.1:0', '--set', 'bcache0.cache_mode=writeback', cache, backing]);
  const line = await serve.daemon.waitForLine(/dashboard on http:\/\//);
  const base = /dashboard on (http:\/\/[^/\s]+)\//.exec(line)?.[1];
  assert.ok(base, `no address in "${line}"`);
  return { serve, base, control: `${serve.socket}.control` };
}

async function stats(base: string): Promise<DashboardStats> {
  const r = await fetch(`${base}/api/stats`);
  assert.equal(r.status, 200);
  return (await r.json()) as DashboardStats;
}

/** The value of a /metrics line with exactly these labels. */
function metric(text: string, name: string, labels: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name}{${labels}} `));
  assert.ok(line !== undefined, `no ${name}{${labels}} in /metrics`);
  return Number(line.slice(line.lastIndexOf(' ') + 1));
}

test('--metrics (alias of --http): /api/stats has the figures of /metrics; the TCP listener changes nothing', async () => {
  using tmp = tempDir();
  const { serve, base } = await serveWithHttp(tmp.dir, '--metrics');
  try {
    const c = await Client.connect(serve.socket);
    try {
      for (let i = 0; i < 8; i++) await c.write(i * 4096, Buffer.alloc(4096, i + 1));
      // Twice: the second pass may come from the copies of hot blocks in memory.
      for (let pass = 0; pass < 2; pass++) for (let i = 0; i < 8; i++) await c.read(i * 4096, 4096);
      await c.flush();
    } finally {
      c.close();
    }
    const s = await stats(base);
    const text = await (await fetch(`${base}/metrics`)).text();
    const dev = s.devices.find((d) => d.name === 'bcache0');
    assert.ok(dev, 'bcache0 in /api/stats');
    assert.equal(dev.running, true);
    assert.equal(dev.cacheMode, 'writeback');
    assert.ok(dev.dirtyBytes > 0, 'writeback mode leaves the writes dirty');
    assert.equal(dev.counters.hits, 16, 'the reads of what was just written hit');
    // Nothing runs between the two requests but the writeback worker, which the counters below do not see.
    assert.equal(metric(text, 'ubcache_cache_hits_total', 'device="bcache0"'), dev.counters.hits);
    assert.equal(metric(text, 'ubcache_writeback_target_bytes', 'device="bcache0"'), dev.writeback.target);
    const write = s.exports.find((e) => e.name === 'bcache0')?.commands.find((x) => x.command === 'write');
    assert.equal(write?.requests, 8);
    assert.equal(metric(text, 'ubcache_nbd_requests_total', 'export="bcache0",command="write"'), 8);
    const set = s.sets[0];
    assert.ok(set);
    assert.equal(metric(text, 'ubcache_cache_available_percent', `set="${set.uuid}"`), set.availablePercent);
    // Every hit asked the copies in memory first (served, or read from the cache device).
    assert.equal(set.ramCache.hits + set.ramCache.misses, 16);
    assert.equal(metric(text, 'ubcache_ram_cache_hits_total', `set="${set.uuid}"`), set.ramCache.hits);
    assert.equal(metric(text, 'ubcache_ram_cache_misses_total', `set="${set.uuid}"`), set.ramCache.misses);
    // Read-only: the attribute tree is on the control socket only.
    const sys = await fetch(`${base}/sys/block/bcache0/bcache/cache_mode`);
    assert.equal(sys.status, 404);
    assert.match(await sys.text(), /no such endpoint .*\/api\/stats/);
    const put = await fetch(`${base}/api/stats`, { method: 'POST', body: 'x' });
    assert.equal(put.status, 405);
    // The page and its library, from the package.
    const page = await fetch(`${base}/`);
    assert.equal(page.status, 200);
    assert.match(page.headers.get('content-security-policy') ?? '', /default-src 'self'/);
    assert.match(await page.text(), /<script src="\/dashboard\/uplot\.js">/);
    const lib = await fetch(`${base}/dashboard/uplot.js`);
    assert.equal(lib.status, 200);
    assert.match(await lib.text(), /uPlot/);
  } finally {
    await serve.daemon.stop().finally(() => serve.daemon.kill());
  }
});

/** Wait, in the page, until `predicate(window.ubcacheDashboard)` returns something truthy (checked at each sample). */
function waitInPage(predicate: string): string {
  return `new Promise((resolve) => {
    const check = () => {
      const r = (${predicate})(window.ubcacheDashboard);
      if (r) {
        window.removeEventListener('ubcache:sample', check);
        resolve(r);
      }
    };
    window.addEventListener('ubcache:sample', check);
    check();
  })`;
}

/** What the test reads of the page's state: the points and last values of every plot. */
const PLOTS = `(d) => Object.fromEntries(Object.entries(d.plots).filter(([, p]) => p).map(([id, p]) => [id, {
  points: p.data[0].length,
  series: p.series.slice(1).map((s) => s.label),
  last: p.data.slice(1).map((ys) => ys[ys.length - 1] ?? null),
  max: p.data.slice(1).map((ys) => Math.max(0, ...ys.filter((v) => v !== null))),
}]))`;

interface PlotState {
  points: number;
  series: string[];
  last: (number | null)[];
  max: number[];
}

test(
  'dashboard in headless Chromium: no console error, the plots move while fio runs, a screenshot',
  { skip: skipBrowser },
  async () => {
    using tmp = tempDir();
    const { serve, base, control } = await serveWithHttp(tmp.dir);
    // A long time-based job, stopped by the test once it has seen what it needs.
    const fio = spawn(
      'fio',
      [
        '--ioengine=nbd',
        `--uri=${serve.uri('bcache0')}`,
        '--name=dashboard',
        '--rw=randrw',
        '--bs=4k',
        '--size=16M',
        '--iodepth=4',
        '--time_based',
        '--runtime=300',
        '--output-format=json',
        `--directory=${tmp.dir}`,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let fioOut = '';
    fio.stdout.setEncoding('utf8');
    fio.stdout.on('data', (t: string) => (fioOut += t));
    let fioErr = '';
    fio.stderr.setEncoding('utf8');
    fio.stderr.on('data', (t: string) => (fioErr += t));
    const fioExit = new Promise<number | null>((res) => {
      fio.once('exit', (code) => {
        res(code);
      });
    });
    const browser = Browser.launch(chromium ?? 'chromium', join(tmp.dir, 'profile'));
    const consoleErrors: string[] = [];
    // The first console error fails the test at once rather than leaving a wait in the page to hang.
    let failPage: (err: Error) => void = () => undefined;
    const pageFailed = new Promise<never>((_resolve, reject) => {
      failPage = reject;
    });
    pageFailed.catch(() => undefined);
    const consoleError = (text: string): void => {
      consoleErrors.push(text);
      failPage(new Error(`the page logged an error: ${text}`));
    };
    const fioStopping = { now: false };
    void fioExit.then((code) => {
      if (!fioStopping.now) failPage(new Error(`fio exited (${code}) before the test stopped it: ${fioErr}`));
    });
    const inPage = <T>(page: string, expression: string): Promise<T> =>
      Promise.race([browser.evaluate<T>(page, expression), pageFailed]);
    browser.on('Runtime.consoleAPICalled', (p) => {
      const type = p['type'];
      if (type === 'error' || type === 'assert') consoleError(`console.${type}: ${JSON.stringify(p['args'])}`);
    });
    browser.on('Runtime.exceptionThrown', (p) => {
      consoleError(`exception: ${JSON.stringify(p['exceptionDetails'])}`);
    });
    browser.on('Log.entryAdded', (p) => {
      const e = p['entry'] as { level: string; text: string; url?: string };
      if (e.level === 'error') consoleError(`log: ${e.text} ${e.url ?? ''}`);
    });
    try {
      const page = await browser.newPage();
      await browser.send('Runtime.enable', {}, page);
      await browser.send('Log.enable', {}, page);
      await browser.send('Page.enable', {}, page);
      await browser.send(
        'Emulation.setDeviceMetricsOverride',
        { width: 1280, height: 900, deviceScaleFactor: 1, mobile: false },
        page,
      );
      const loaded = browser.once('Page.loadEventFired', page);
      await browser.send('Page.navigate', { url: `${base}/` }, page);
      await loaded;

      // fio's requests show: some IOPS plotted, two samples in.
      const first = await inPage<{ points: number; requests: number }>(
        page,
        waitInPage(`(d) => {
        const p = d.plots.iops;
        if (!p || p.data[0].length < 2 || !p.data.slice(1).some((ys) => (ys[ys.length - 1] ?? 0) > 0)) return null;
        return { points: p.data[0].length, requests: d.stats.exports[0].commands.reduce((n, c) => n + c.requests, 0) };
      }`),
      );
      // A warning from the daemon (a no-op io_disable write logs one) reaches the page's recent errors.
      const uuid = (await stats(base)).sets[0]?.uuid ?? '';
      const w = await controlRequest(control, 'PUT', `/sys/fs/bcache/${uuid}/internal/io_disable`, '0');
      assert.equal(w.status, 204);
      // The plots move: more points, and the request counters went on.
      const moved = await inPage<{ requests: number; plots: Record<string, PlotState> }>(
        page,
        waitInPage(`(d) => {
        const p = d.plots.iops;
        const requests = d.stats.exports[0].commands.reduce((n, c) => n + c.requests, 0);
        const warned = d.stats.recentErrors.some((e) => e.line.includes('CACHE_SET_IO_DISABLE already cleared'));
        if (p.data[0].length <= ${first.points} || requests <= ${first.requests} || !warned) return null;
        return { requests, plots: (${PLOTS})(d) };
      }`),
      );
      assert.ok(moved.requests > first.requests);
      const plots = moved.plots;
      assert.deepEqual(Object.keys(plots).sort(), [
        'available',
        'cacheio',
        'dirty',
        'gc',
        'hits',
        'iops',
        'latency',
        'writeback',
      ]);
      const iops = plots['iops'];
      assert.ok(iops && iops.points > first.points, 'the IOPS plot gained points');
      assert.deepEqual(iops.series, ['bcache0 read', 'bcache0 write', 'bcache0 other']);
      assert.ok((iops.max[0] ?? 0) > 0 && (iops.max[1] ?? 0) > 0, `reads and writes plotted: ${JSON.stringify(iops)}`);
      assert.ok((plots['latency']?.max[1] ?? 0) > 0, 'a write latency plotted');
      assert.ok((plots['dirty']?.max[0] ?? 0) > 0, 'dirty data plotted (writeback mode)');
      assert.deepEqual(plots['writeback']?.series, ['bcache0 rate', 'bcache0 proportional', 'bcache0 integral']);
      assert.ok((plots['available']?.last[0] ?? 0) > 0, 'cache available plotted');
      for (const [id, p] of Object.entries(plots)) assert.equal(p.points, iops.points, `${id} has every sample`);
      const tables = await inPage<{ devices: string; errors: string }>(
        page,
        `({ devices: document.querySelector('#devices tbody').innerText, errors: document.getElementById('errors').innerText })`,
      );
      assert.match(tables.devices, /^bcache0\s+\S*backing\.img\s+(clean|dirty)\s+yes\s+writeback\s/);
      assert.match(tables.errors, /warning: bcache: io_disable: CACHE_SET_IO_DISABLE already cleared/);

      const out = process.env['UBCACHE_DASHBOARD_PNG'];
      if (out !== undefined) {
        // For the docs: a minute of history.
        await inPage(page, waitInPage(`(d) => d.samples >= 60`));
      }
      const height = await inPage<number>(page, 'document.documentElement.scrollHeight');
      await browser.send(
        'Emulation.setDeviceMetricsOverride',
        { width: 1280, height, deviceScaleFactor: 1, mobile: false },
        page,
      );
      const shot = (await browser.send('Page.captureScreenshot', { format: 'png' }, page)) as { data: string };
      const png = Buffer.from(shot.data, 'base64');
      assert.equal(png.subarray(1, 4).toString('latin1'), 'PNG');
      writeFileSync(join(tmp.dir, 'dashboard.png'), png);
      if (out !== undefined) writeFileSync(resolve(out), png);
      assert.deepEqual(consoleErrors, [], 'no console error');
    } finally {
      await browser.close();
      fioStopping.now = true;
      fio.kill('SIGTERM');
      const code = await fioExit;
      await serve.daemon.stop().finally(() => serve.daemon.kill());
      // fio exits 128 when a signal ends it, and still reports its jobs: none may have had an I/O error.
      assert.ok(code === 0 || code === 128, `fio exited ${code}: ${fioErr}`);
      const jobs = (JSON.parse(fioOut.slice(fioOut.indexOf('{'))) as { jobs: { error: number }[] }).jobs;
      assert.ok(jobs.length > 0 && jobs.every((j) => j.error === 0), `fio: ${fioOut}`);
    }
  },
);
