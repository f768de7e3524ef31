// The import graph of src/ and its circles.
//
//   node --import tsx scripts/import-graph.ts [DIR]    (default: src)
//
// Prints every circle (one strongly connected component of the graph per
// line, and one concrete path through it) and exits 1 if there is any.
// test/util/import-graph.test.ts runs the same check on every `npm test`.
//
// Every import counts, `import type` included: a type-only import vanishes
// at run time, but it still means that neither file can be understood, moved
// or tested without the other, which is what a clean graph is for. Both
// kinds are recorded (`typeOnly` on an edge) so that a report can tell them
// apart. Imports are read with TypeScript's own parser (static imports and
// re-exports, `import()` expressions and `import('...')` types); only
// relative specifiers are followed, since packages and node: modules cannot
// import us back.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import ts from 'typescript';

export interface ImportEdge {
  readonly from: string;
  readonly to: string;
  /** Every import of `to` by `from` is type-only (`import type`, `import { type X }` only, `import('...')` types). */
  readonly typeOnly: boolean;
}

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...sourceFiles(p));
    else if (name.endsWith('.ts') && !name.endsWith('.d.ts')) out.push(p);
  }
  return out;
}

/** The relative imports of one file: specifier → whether every use of it is type-only. */
function importsOf(file: string): Map<string, boolean> {
  const sf = ts.createSourceFile(file, readFileSync(file, 'utf8'), ts.ScriptTarget.Latest, true);
  const found = new Map<string, boolean>();
  const add = (spec: string, typeOnly: boolean): void => {
    if (!spec.startsWith('.')) return;
    found.set(spec, (found.get(spec) ?? true) && typeOnly);
  };
  const visit = (node: ts.Node): void => {
    if (ts.isImportDeclaration(node) && ts.isStringLiteral(node.moduleSpecifier)) {
      const clause = node.importClause;
      let typeOnly = false;
      if (clause !== undefined) {
        if (clause.phaseModifier === ts.SyntaxKind.TypeKeyword) typeOnly = true;
        else if (clause.name === undefined && clause.namedBindings !== undefined) {
          const b = clause.namedBindings;
          typeOnly = ts.isNamedImports(b) && b.elements.length > 0 && b.elements.every((e) => e.isTypeOnly);
        }
      }
      add(node.moduleSpecifier.text, typeOnly);
    } else if (ts.isExportDeclaration(node) && node.moduleSpecifier && ts.isStringLiteral(node.moduleSpecifier)) {
      const c = node.exportClause;
      const typeOnly =
        node.isTypeOnly || (c !== undefined && ts.isNamedExports(c) && c.elements.every((e) => e.isTypeOnly));
      add(node.moduleSpecifier.text, typeOnly);
    } else if (ts.isImportTypeNode(node)) {
      const arg = node.argument;
      if (ts.isLiteralTypeNode(arg) && ts.isStringLiteral(arg.literal)) add(arg.literal.text, true);
    } else if (
      ts.isCallExpression(node) &&
      node.expression.kind === ts.SyntaxKind.ImportKeyword &&
      node.arguments[0] !== undefined &&
      ts.isStringLiteral(node.arguments[0])
    ) {
      add(node.arguments[0].text, false);
    }
    ts.forEachChild(node, visit);
  };
  visit(sf);
  return found;
}

/** The import graph of every .ts file under `dir`, paths relative to `dir`, edges sorted. */
export function importGraph(dir: string): ImportEdge[] {
  const root = resolve(dir);
  const files = sourceFiles(root);
  const known = new Set(files);
  const edges: ImportEdge[] = [];
  for (const file of files) {
    for (const [spec, typeOnly] of importsOf(file)) {
      let target = resolve(dirname(file), spec);
      if (target.endsWith('.js')) target = target.slice(0, -3) + '.ts';
      if (!known.has(target)) continue; // outside dir (or not a module of ours)
      edges.push({ from: relative(root, file), to: relative(root, target), typeOnly });
    }
  }
  return edges.sort((a, b) => (a.from === b.from ? a.to.localeCompare(b.to) : a.from.localeCompare(b.from)));
}

/**
 * The circles of a graph: its strongly connected components of more than one
 * file (or a file importing itself), each sorted, largest first (Tarjan's
 * algorithm, iterative so that a deep graph cannot overflow the stack).
 */
export function circles(edges: readonly ImportEdge[]): string[][] {
  const next = new Map<string, string[]>();
  for (const e of edges) {
    const list = next.get(e.from) ?? [];
    list.push(e.to);
    next.set(e.from, list);
    if (!next.has(e.to)) next.set(e.to, []);
  }
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const onStack = new Set<string>();
  const stack: string[] = [];
  const out: string[][] = [];
  let counter = 0;
  for (const start of next.keys()) {
    if (index.has(start)) continue;
    const work: { node: string; i: number }[] = [{ node: start, i: 0 }];
    index.set(start, counter);
    low.set(start, counter++);
    stack.push(start);
    onStack.add(start);
    while (work.length > 0) {
      const top = work[work.length - 1];
      if (top === undefined) break;
      const succ = next.get(top.node) ?? [];
      if (top.i < succ.length) {
        const w = succ[top.i++];
        if (w === undefined) continue;
        if (!index.has(w)) {
          index.set(w, counter);
          low.set(w, counter++);
          stack.push(w);
          onStack.add(w);
          work.push({ node: w, i: 0 });
        } else if (onStack.has(w)) {
          low.set(top.node, Math.min(low.get(top.node) ?? 0, index.get(w) ?? 0));
        }
        continue;
      }
      work.pop();
      const parent = work[work.length - 1];
      if (parent !== undefined) low.set(parent.node, Math.min(low.get(parent.node) ?? 0, low.get(top.node) ?? 0));
      if (low.get(top.node) === index.get(top.node)) {
        const scc: string[] = [];
        for (;;) {
          const w = stack.pop();
          if (w === undefined) break;
          onStack.delete(w);
          scc.push(w);
          if (w === top.node) break;
        }
        if (scc.length > 1 || succ.includes(top.node)) out.push(scc.sort());
      }
    }
  }
  return out.sort((a, b) => b.length - a.length || (a[0] ?? '').localeCompare(b[0] ?? ''));
}

/** One shortest path from a file of a circle back to itself, through the circle (for messages). */
export function examplePath(edges: readonly ImportEdge[], circle: readonly string[]): string[] {
  const members = new Set(circle);
  const start = circle[0];
  if (start === undefined) return [];
  const prev = new Map<string, string>();
  const queue = [start];
  while (queue.length > 0) {
    const at = queue.shift();
    if (at === undefined) break;
    for (const e of edges) {
      if (e.from !== at || !members.has(e.to)) continue;
      if (e.to === start) {
        const path = [start];
        for (let p: string | undefined = at; p !== undefined && p !== start; p = prev.get(p)) path.unshift(p);
        path.unshift(start);
        return path;
      }
      if (!prev.has(e.to)) {
        prev.set(e.to, at);
        queue.push(e.to);
      }
    }
  }
  return [];
}

/** The report: one line per circle, with a path through it; type-only steps marked `(type)`. */
export function describeCircles(edges: readonly ImportEdge[]): string[] {
  return circles(edges).map((c) => {
    const path = examplePath(edges, c);
    const steps = path.map((p, i) => {
      const from = path[i - 1];
      const e = from === undefined ? undefined : edges.find((x) => x.from === from && x.to === p);
      return e?.typeOnly === true ? `(type) ${p}` : p;
    });
    return `${c.length} files: ${c.join(', ')}\n    e.g. ${steps.join(' -> ')}`;
  });
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === resolve(import.meta.filename)) {
  const dir = process.argv[2] ?? join(import.meta.dirname, '..', 'src');
  const edges = importGraph(dir);
  const report = describeCircles(edges);
  const files = new Set(edges.flatMap((e) => [e.from, e.to])).size;
  console.log(`${edges.length} imports between ${files} files under ${relative(process.cwd(), dir) || '.'}`);
  if (report.length === 0) console.log('no circles');
  else {
    console.log(`${report.length} circle(s):`);
    for (const line of report) console.log(`  ${line}`);
    process.exitCode = 1;
  }
}
