// Assertions: invariants stated where they are relied on. Input is
// validated once, at the edge (the NBD transmission, sysfs stores, the
// on-disk decoders), and reported to whoever sent it; below the edge a
// condition that does not hold is a bug in ubcache, and an assertion stops
// the operation with the invariant named instead of letting it go on with
// `undefined` (which is what a cast such as `xs[i] as T` would have done).
//
// Cheap enough for request paths: a comparison and a constant string. Keep
// the invariant a string literal (a template would be built on every call),
// and leave the tightest loops (binary searches, checksums, GC's marking) to
// their loop bounds.

/** An invariant that does not hold: a bug, never bad input. */
export class InvariantError extends Error {
  readonly invariant: string;
  constructor(invariant: string) {
    super(`invariant violated: ${invariant}`);
    this.name = 'InvariantError';
    this.invariant = invariant;
  }
}

/** Throw InvariantError naming `invariant` unless `condition` holds. */
export function assert(condition: boolean, invariant: string): asserts condition {
  if (!condition) throw new InvariantError(invariant);
}

/** `value`, which `invariant` says is there (an element inside its array's bounds, say). */
export function defined<T>(value: T | undefined, invariant: string): T {
  if (value === undefined) throw new InvariantError(invariant);
  return value;
}
