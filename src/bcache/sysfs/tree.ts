// The attribute tree: bcache's sysfs, rooted at /sys, over the live
// registry. Paths are the kernel's (/sys/fs/bcache/..., /sys/block/bcacheN/
// bcache/...); the leading /sys may be omitted. Reads return exactly what
// the kernel's show functions print; writes are parsed as the kernel's
// stores parse them and refused with its errno, changing nothing.
//
// The tree owns one Worker: the accounting tick that folds the request
// counters into the decaying stats views every 300 s / 22. stop() ends it,
// refuses further writes with EBUSY (as the kernel does while rebooting)
// and waits for the operations writes started (detach, stop, unregister).

import { errorMessage, Worker } from '../../util/lifecycle.ts';
import { log } from '../../util/log.ts';
import { OperationError } from '../errors.ts';
import type { Registry } from '../registry.ts';
import type { CacheAccounting } from '../stats.ts';
import { ACCOUNTING_INTERVAL_MS, AccountingViews } from './accounting.ts';
import type { TreeContext } from './context.ts';
import { deviceDir } from './device-dir.ts';
import { flashDir } from './flash-dir.ts';
import { dir, ro, SysfsError, wo, type SysfsDir, type SysfsFile, type SysfsNode } from './node.ts';
import { setDir } from './set-dir.ts';

/** The most a sysfs store accepts (one page). */
export const MAX_STORE_BYTES = 4096;
const MAX_LINK_HOPS = 8;

/** A value in the JSON view: a file's value, null for write-only files, a directory, or a link. */
export type TreeJson = string | null | { $link: string } | { [name: string]: TreeJson };

export interface SysfsTreeOptions {
  /** The accounting tick's period (tests shorten it or call tick() themselves). */
  accountingIntervalMs?: number;
  /**
   * Files of the daemon itself, listed in /sys/fs/bcache after the kernel's
   * (serve's `shutdown`): the module-level place, where the kernel has
   * register and pendings_cleanup.
   */
  daemonFiles?: ReadonlyArray<readonly [string, SysfsFile]>;
}

export class SysfsTree {
  readonly registry: Registry;
  readonly views = new AccountingViews();
  private readonly worker: Worker;
  private readonly pending = new Set<Promise<void>>();
  private stopping = false;
  private readonly root: SysfsDir;
  private readonly ctx: TreeContext;
  private readonly daemonFiles: ReadonlyArray<readonly [string, SysfsFile]>;

  constructor(registry: Registry, options: SysfsTreeOptions = {}) {
    this.registry = registry;
    this.daemonFiles = options.daemonFiles ?? [];
    this.ctx = {
      registry,
      views: this.views,
      background: (what, op) => {
        this.background(what, op);
      },
    };
    const interval = options.accountingIntervalMs ?? ACCOUNTING_INTERVAL_MS;
    this.worker = Worker.periodic(
      'bcache accounting',
      () => interval,
      () => {
        this.tick();
        return Promise.resolve();
      },
      { clock: registry.clock },
    );
    this.root = this.buildRoot();
  }

  start(): this {
    this.worker.start();
    return this;
  }

  /** Refuse new writes, stop the accounting tick, wait for operations in flight. */
  async stop(): Promise<void> {
    this.stopping = true;
    if (this.worker.state !== 'new') await this.worker.stop();
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  /** Fold the counters collected since the last tick into the decaying views (scale_accounting). */
  tick(): void {
    const accs: CacheAccounting[] = [];
    for (const d of this.registry.devices) accs.push(d.stats);
    for (const s of this.registry.sets.values()) accs.push(s.stats);
    this.views.tick(accs);
  }

  private background(what: string, op: () => Promise<void>): void {
    const p = op().then(
      () => undefined,
      (err: unknown) => {
        log.error(`${what} failed: ${errorMessage(err)}`);
      },
    );
    this.pending.add(p);
    void p.finally(() => this.pending.delete(p));
  }

  private buildRoot(): SysfsDir {
    const registry = this.registry;
    const register =
      (quiet: boolean) =>
      async (text: string): Promise<void> => {
        const path = text.trim();
        if (path === '') throw new SysfsError('EINVAL', 'register: write the path of a cache or backing device');
        try {
          await registry.registerPath(path, { quiet });
        } catch (err) {
          if (err instanceof OperationError) {
            log.info(`bcache: register_bcache() error ${path}: ${err.message}`);
            throw new SysfsError(err.code, err.message, { cause: err });
          }
          throw err;
        }
      };
    const fsBcache = dir(() => [
      ['register', wo(register(false))],
      ['register_quiet', wo(register(true))],
      [
        'pendings_cleanup',
        wo(() => {
          this.background('pendings_cleanup', () => registry.stopPending());
        }),
      ],
      ...this.daemonFiles,
      ...[...registry.sets.values()].map((s) => [s.uuid, setDir(this.ctx, s)] as const),
    ]);
    const block = dir(() => [
      ...registry.devices.map((d) => {
        const entries: Array<readonly [string, SysfsNode]> = [['bcache', deviceDir(this.ctx, d)]];
        if (d.running) entries.push(['size', ro(() => String(d.sectors))]);
        return [d.name, dir(() => entries)] as const;
      }),
      ...registry.volumes.map(
        (v) =>
          [
            v.name,
            dir(() => [
              ['bcache', flashDir(this.ctx, v)],
              ['size', ro(() => String(v.sectors))],
            ]),
          ] as const,
      ),
    ]);
    return dir(() => [
      ['fs', dir(() => [['bcache', fsBcache]])],
      ['block', block],
    ]);
  }

  /** Resolve a path to its node, following links. */
  private resolve(path: string): { path: string; node: SysfsNode } {
    let segments = splitPath(path);
    let node: SysfsNode = this.root;
    let hops = 0;
    for (let i = 0; i < segments.length; i++) {
      const name = segments[i] ?? '';
      if (node.kind !== 'dir') {
        throw new SysfsError('ENOTDIR', `/sys/${segments.slice(0, i).join('/')} is not a directory`);
      }
      const next: SysfsNode | undefined = node.entries().find(([n]) => n === name)?.[1];
      if (!next) {
        throw new SysfsError(
          'ENOENT',
          `/sys/${segments.slice(0, i + 1).join('/')}: no such file or directory; list /sys/${segments.slice(0, i).join('/')} to see what is there`,
        );
      }
      if (next.kind === 'link') {
        if (++hops > MAX_LINK_HOPS) throw new SysfsError('EINVAL', `${path}: too many levels of links`);
        // Restart from the link's target with the rest of the path.
        segments = [...splitPath(next.target), ...segments.slice(i + 1)];
        node = this.root;
        i = -1;
        continue;
      }
      node = next;
    }
    return { path: `/sys/${segments.join('/')}`, node };
  }

  /** cat PATH */
  read(path: string): string {
    const { path: p, node } = this.resolve(path);
    if (node.kind === 'dir') throw new SysfsError('EISDIR', `${p} is a directory; list it instead`);
    const f = node as SysfsFile;
    if (!f.show) throw new SysfsError('EACCES', `${p} is write-only (mode 0200); write to it instead`);
    return f.show();
  }

  /** echo VALUE > PATH */
  async write(path: string, value: string): Promise<void> {
    const { path: p, node } = this.resolve(path);
    if (node.kind === 'dir') throw new SysfsError('EISDIR', `${p} is a directory; write to a file in it`);
    const f = node as SysfsFile;
    if (!f.store) throw new SysfsError('EACCES', `${p} is read-only (mode 0444)`);
    if (Buffer.byteLength(value) > MAX_STORE_BYTES) {
      throw new SysfsError('EINVAL', `${p}: a value may be at most ${MAX_STORE_BYTES} bytes`);
    }
    if (this.stopping) throw new SysfsError('EBUSY', 'bcache is shutting down; nothing was changed');
    await f.store(value);
  }

  /** ls PATH: names in listing order. */
  list(path: string): string[] {
    const { path: p, node } = this.resolve(path);
    if (node.kind !== 'dir') throw new SysfsError('ENOTDIR', `${p} is not a directory; read it instead`);
    return node.entries().map(([n]) => n);
  }

  /** Kind and mode of what PATH names, without following a final link. */
  stat(path: string): { kind: 'file' | 'dir' | 'link'; mode: number } {
    const segments = splitPath(path);
    const last = segments.pop();
    if (last === undefined) return { kind: 'dir', mode: 0o755 };
    const { node: parent } = this.resolve(segments.join('/'));
    if (parent.kind !== 'dir') throw new SysfsError('ENOTDIR', `/sys/${segments.join('/')} is not a directory`);
    const node = parent.entries().find(([n]) => n === last)?.[1];
    if (!node) throw new SysfsError('ENOENT', `/sys/${[...segments, last].join('/')}: no such file or directory`);
    if (node.kind === 'file') return { kind: 'file', mode: node.mode };
    return { kind: node.kind, mode: node.kind === 'dir' ? 0o755 : 0o777 };
  }

  /** The whole tree (or the subtree at PATH) as JSON: values without their final newline. */
  json(path = '/sys'): TreeJson {
    const { node } = this.resolve(path);
    return toJson(node);
  }
}

function toJson(node: SysfsNode): TreeJson {
  if (node.kind === 'link') return { $link: node.target };
  if (node.kind === 'file') {
    if (!node.show) return null;
    const v = node.show();
    return v.endsWith('\n') ? v.slice(0, -1) : v;
  }
  const out: { [name: string]: TreeJson } = {};
  for (const [name, child] of node.entries()) out[name] = toJson(child);
  return out;
}

/** "/sys/fs/bcache", "fs/bcache/" and "/fs/bcache" all name the same directory. */
export function splitPath(path: string): string[] {
  const parts = path.split('/').filter((s) => s !== '');
  if (parts[0] === 'sys') parts.shift();
  for (const p of parts) {
    if (p === '.' || p === '..') {
      throw new SysfsError('EINVAL', `${path}: "." and ".." are not allowed; give the full path from /sys`);
    }
    if (p.includes('\0')) throw new SysfsError('EINVAL', `${path}: the path contains a NUL byte`);
  }
  return parts;
}
