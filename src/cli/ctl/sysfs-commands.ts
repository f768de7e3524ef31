// The sysfs-like commands: cat, write (echo >), ls and tree.

import type { Control } from './connection.ts';
import { sysPath } from './connection.ts';
import { isDir, type Json } from './tree-json.ts';

export async function cat(ctl: Control, path: string): Promise<string> {
  return ctl.read(path);
}

export async function ls(ctl: Control, path: string): Promise<string> {
  const j = await ctl.json(path);
  return isDir(j)
    ? Object.keys(j)
        .map((n) => `${n}\n`)
        .join('')
    : `${sysPath(path)}\n`;
}

function printTree(j: Json, prefix: string, out: string[]): void {
  if (!isDir(j)) return;
  for (const [name, v] of Object.entries(j)) {
    const path = `${prefix}/${name}`;
    if (v === null) continue;
    if (typeof v === 'string')
      out.push(v.includes('\n') ? `${path}:\n  ${v.split('\n').join('\n  ')}` : `${path}: ${v}`);
    else if (isDir(v)) printTree(v, path, out);
    else out.push(`${path} -> ${String(v['$link'])}`);
  }
}

/** Every attribute below PATH with its value, one a line. */
export async function tree(ctl: Control, path: string): Promise<string> {
  const out: string[] = [];
  printTree(await ctl.json(path), sysPath(path), out);
  return out.map((l) => `${l}\n`).join('');
}
