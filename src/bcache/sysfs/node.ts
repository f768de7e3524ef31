// The shapes of the attribute tree: directories, attribute files and links,
// built on demand from the live engine so that a listing or a read always
// shows the current objects. A file's show() returns exactly the bytes the
// kernel's show function prints (newline included); store() receives what
// was written, as a sysfs store does, and throws SysfsError with the errno
// the kernel returns.

import { AttributeError, type Attribute } from '../attributes.ts';

export type Errno = 'EINVAL' | 'ENOENT' | 'EBUSY' | 'EACCES' | 'EIO' | 'ENOTDIR' | 'EISDIR' | 'EPERM';

/** A refused read or write: the errno a sysfs file would return, and a message saying what to do. */
export class SysfsError extends Error {
  readonly code: Errno;
  constructor(code: Errno, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SysfsError';
    this.code = code;
  }
}

export interface SysfsFile {
  readonly kind: 'file';
  /** Octal mode as sysfs shows it: 0644 read/write, 0444 read-only, 0200 write-only. */
  readonly mode: number;
  readonly show?: () => string;
  readonly store?: (text: string) => Promise<void>;
}

export interface SysfsDir {
  readonly kind: 'dir';
  /** The entries, in listing order, computed when asked. */
  readonly entries: () => ReadonlyArray<readonly [string, SysfsNode]>;
}

export interface SysfsLink {
  readonly kind: 'link';
  /** Absolute path (/sys/...) of what the link points to. */
  readonly target: string;
}

export type SysfsNode = SysfsFile | SysfsDir | SysfsLink;

/** A read-only attribute; `show` returns the value without its newline. */
export function ro(show: () => string): SysfsFile {
  return { kind: 'file', mode: 0o444, show: () => `${show()}\n` };
}

/** A read-only attribute whose show() already ends as the kernel's does (multi-line text). */
export function roRaw(show: () => string): SysfsFile {
  return { kind: 'file', mode: 0o444, show };
}

export function wo(store: (text: string) => Promise<void> | void): SysfsFile {
  return {
    kind: 'file',
    mode: 0o200,
    store: async (text) => {
      await store(text);
    },
  };
}

export function rw(show: () => string, store: (text: string) => Promise<void> | void): SysfsFile {
  return {
    kind: 'file',
    mode: 0o644,
    show: () => `${show()}\n`,
    store: async (text) => {
      await store(text);
    },
  };
}

export function dir(entries: () => ReadonlyArray<readonly [string, SysfsNode]>): SysfsDir {
  return { kind: 'dir', entries };
}

export function link(target: string): SysfsLink {
  return { kind: 'link', target };
}

/** A settable attribute of attributes.ts as a file: parse errors are EINVAL, nothing is changed. */
export function attributeFile<T>(attr: Attribute<T>, target: () => T, show?: (t: T) => string): SysfsFile {
  return rw(
    () => (show ? show(target()) : attr.show(target())),
    async (text) => {
      let apply;
      try {
        apply = attr.parse(text);
      } catch (err) {
        if (err instanceof AttributeError) throw new SysfsError('EINVAL', err.message);
        throw err;
      }
      await apply(target());
    },
  );
}

/** kstrtoul as the kernel's plain integer stores use it (trailing newline allowed). */
export function parseUlong(name: string, text: string): number {
  const t = text.endsWith('\n') ? text.slice(0, -1) : text;
  if (!/^\+?[0-9]+$/.test(t)) throw new SysfsError('EINVAL', `${name}: "${text}" is not a whole number`);
  return Number(t);
}
