// The import graph of src/ has no circle (scripts/import-graph.ts), type-only
// imports included; and the checker itself finds the circles it should.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { circles, describeCircles, importGraph } from '../../scripts/import-graph.ts';

const SRC = join(import.meta.dirname, '..', '..', 'src');

test('src/ has no import circle, type-only imports included', () => {
  const edges = importGraph(SRC);
  assert.ok(edges.length > 100, `the graph was read (${edges.length} imports)`);
  assert.ok(
    edges.some((e) => e.from === 'bcache/cached-dev.ts' && e.to === 'bcache/request.ts'),
    'cached-dev.ts imports request.ts',
  );
  assert.deepEqual(describeCircles(edges), [], 'circles in src/ (node --import tsx scripts/import-graph.ts)');
});

test('the checker finds circles through runtime and type-only imports, and nothing else', () => {
  const dir = mkdtempSync(join(tmpdir(), 'import-graph-'));
  try {
    mkdirSync(join(dir, 'sub'));
    const files: Record<string, string> = {
      // a <-> b, one side type-only.
      'a.ts': "import type { B } from './b.ts';\nexport const a = 1;\nexport type A = B;\n",
      'b.ts': "import { a } from './a.ts';\nexport type B = number;\nexport const b = a;\n",
      // c -> sub/d -> e -> c, through a re-export and a dynamic import.
      'c.ts': "export { d } from './sub/d.ts';\n",
      'sub/d.ts': "export const d = 1;\nexport async function e() { return import('../e.ts'); }\n",
      'e.ts': "import * as c from './c.ts';\nexport const x = c;\n",
      // f -> a, and a package: in no circle.
      'f.ts':
        "import { a } from './a.ts';\nimport { readFileSync } from 'node:fs';\nexport const f = [a, readFileSync];\n",
      // g imports itself through an import('...') type.
      'g.ts': "export type G = { next: import('./g.ts').G | undefined };\n",
      // h -> i with only `type` specifiers: type-only.
      'h.ts': "import { type I } from './i.ts';\nexport type H = I;\n",
      'i.ts': 'export type I = string;\n',
    };
    for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
    const edges = importGraph(dir);
    const edge = (from: string, to: string) => edges.find((e) => e.from === from && e.to === to);
    assert.equal(edge('a.ts', 'b.ts')?.typeOnly, true);
    assert.equal(edge('b.ts', 'a.ts')?.typeOnly, false);
    assert.equal(edge('h.ts', 'i.ts')?.typeOnly, true);
    assert.equal(edge('sub/d.ts', 'e.ts')?.typeOnly, false, 'a dynamic import is a runtime import');
    assert.equal(edge('f.ts', 'a.ts')?.typeOnly, false);
    assert.deepEqual(circles(edges), [['c.ts', 'e.ts', 'sub/d.ts'], ['a.ts', 'b.ts'], ['g.ts']]);
    const report = describeCircles(edges);
    assert.equal(report.length, 3);
    assert.match(report[1] ?? '', /a\.ts -> \(type\) b\.ts -> a\.ts/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
