// The live dashboard: a static page (src/control/dashboard/, copied next to
// this module's build by scripts/build.mjs) that polls /api/stats every
// second and plots it with uPlot, served from the installed npm package (no
// CDN, nothing built for the browser). /api/stats is stats.ts's snapshot,
// the one /metrics renders, plus the recent warnings and errors.
//
//   GET /                    the page
//   GET /dashboard/FILE      its script and style, and uPlot's
//   GET /api/stats           the snapshot as JSON

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { errorMessage } from '../util/lifecycle.ts';
import type { LogEntry } from './recent-log.ts';
import type { StatsSnapshot } from './stats.ts';

/** What /api/stats answers. */
export interface DashboardStats extends StatsSnapshot {
  /** The last warnings and errors logged, oldest first. */
  recentErrors: LogEntry[];
}

interface Asset {
  /** Where the file is: in the dashboard directory, or resolved from an npm package. */
  from: { dir: string } | { module: string };
  type: string;
}

const ASSETS = new Map<string, Asset>([
  ['/', { from: { dir: 'index.html' }, type: 'text/html; charset=utf-8' }],
  ['/dashboard/dashboard.js', { from: { dir: 'dashboard.js' }, type: 'text/javascript; charset=utf-8' }],
  ['/dashboard/dashboard.css', { from: { dir: 'dashboard.css' }, type: 'text/css; charset=utf-8' }],
  // The IIFE build defines the global uPlot: the page loads it with a plain script tag.
  ['/dashboard/uplot.js', { from: { module: 'uplot/dist/uPlot.iife.min.js' }, type: 'text/javascript; charset=utf-8' }],
  ['/dashboard/uplot.css', { from: { module: 'uplot/dist/uPlot.min.css' }, type: 'text/css; charset=utf-8' }],
]);

/**
 * Everything the page loads comes from this listener: a script or a style
 * from anywhere else (a CDN, an injected tag) is refused by the browser.
 */
export const DASHBOARD_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'";

const cache = new Map<string, Buffer>();

function assetPath(asset: Asset): string {
  if ('dir' in asset.from) return fileURLToPath(new URL(`./dashboard/${asset.from.dir}`, import.meta.url));
  return createRequire(import.meta.url).resolve(asset.from.module);
}

/**
 * A file of the page: its type and bytes, read once and kept (they do not
 * change while the daemon runs). Throws, naming the file, when the
 * installation lacks it.
 */
export function dashboardAsset(pathname: string): { type: string; body: Buffer } | undefined {
  const asset = ASSETS.get(pathname);
  if (!asset) return undefined;
  let body = cache.get(pathname);
  if (!body) {
    let path = '(unresolved)';
    try {
      path = assetPath(asset);
      body = readFileSync(path);
    } catch (err) {
      const what = 'module' in asset.from ? `the npm package file ${asset.from.module}` : path;
      throw new Error(
        `the dashboard's ${pathname} is missing: cannot read ${what} (${errorMessage(err)}); ` +
          'reinstall ubcache, or run `npm ci && npm run build` in a checkout',
        { cause: err },
      );
    }
    cache.set(pathname, body);
  }
  return { type: asset.type, body };
}
