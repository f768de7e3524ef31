// Seeded tests run a fixed range of seeds in CI; an environment variable
// (FROM-TO, both included) runs another range, for a hunt.

/** The seeds from `variable` (FROM-TO, both included), else `from`..`to`. */
export function seedsFromEnv(variable: string, from: number, to: number): number[] {
  const m = /^(\d+)-(\d+)$/.exec(process.env[variable] ?? '');
  const first = m ? Number(m[1]) : from;
  const last = m ? Number(m[2]) : to;
  return Array.from({ length: Math.max(0, last - first + 1) }, (_, i) => first + i);
}
