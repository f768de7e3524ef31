// The engine as `npm run build` compiled it (dist/), for the benchmarks that
// drive it in-process (engine-micro.ts, admission-engine.ts), not as tsx
// transforms the sources on the fly: tsx keeps function names with a helper
// call around every closure, which costs the engine's hot paths several
// percent. UBCACHE_DIST points elsewhere (a private build, while others
// rebuild dist/).

const distRoot = process.env['UBCACHE_DIST'] ?? new URL('../dist/', import.meta.url).pathname;

async function fromDist<T>(path: string): Promise<T> {
  return (await import(new URL(path, `file://${distRoot.endsWith('/') ? distRoot : `${distRoot}/`}`).href)) as T;
}

export const { MemoryBlockDevice } = await fromDist<typeof import('../src/blockdev/memory.ts')>('blockdev/memory.js');
export const { Registry } = await fromDist<typeof import('../src/bcache/registry.ts')>('bcache/registry.js');
export const { Prng } = await fromDist<typeof import('../src/util/prng.ts')>('util/prng.js');
export const { encodeSuperblock, newBackingSuperblock, newCacheSuperblock } =
  await fromDist<typeof import('../src/format/superblock.ts')>('format/superblock.js');
export const { SB_OFFSET } = await fromDist<typeof import('../src/format/constants.ts')>('format/constants.js');
