import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { CrashableBlockDevice, type CrashPolicy } from '../../src/blockdev/crashable.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { pattern } from './helpers.ts';

const SECTOR = 512;
const SECTORS = 32;
const SIZE = SECTORS * SECTOR;

type Op =
  | { op: 'write'; sector: number; count: number; seed: number; fua: boolean }
  | { op: 'zero'; sector: number; count: number; fua: boolean }
  | { op: 'discard'; sector: number; count: number }
  | { op: 'flush' };

const extent = fc
  .record({ sector: fc.nat({ max: SECTORS - 1 }), count: fc.integer({ min: 1, max: 12 }) })
  .map(({ sector, count }) => ({ sector, count: Math.min(count, SECTORS - sector) }));

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .tuple(extent, fc.nat(), fc.boolean())
      .map(([e, seed, fua]) => ({ op: 'write' as const, ...e, seed, fua })),
  },
  { weight: 2, arbitrary: fc.tuple(extent, fc.boolean()).map(([e, fua]) => ({ op: 'zero' as const, ...e, fua })) },
  { weight: 1, arbitrary: extent.map((e) => ({ op: 'discard' as const, ...e })) },
  { weight: 2, arbitrary: fc.constant({ op: 'flush' as const }) },
);

/**
 * Per sector: the content that is durable (`floor`) and the contents written
 * since, newest last. After a power cut a sector must read as one of them.
 */
class SectorModel {
  floor: Buffer[] = Array.from({ length: SECTORS }, () => Buffer.alloc(SECTOR));
  since: Buffer[][] = Array.from({ length: SECTORS }, () => []);

  put(sector: number, data: Buffer, durable: boolean): void {
    if (durable) {
      this.floor[sector] = data;
      this.since[sector] = [];
    } else {
      this.since[sector]?.push(data);
    }
  }

  newest(sector: number): Buffer {
    const s = this.since[sector] ?? [];
    return s[s.length - 1] ?? this.floor[sector] ?? Buffer.alloc(SECTOR);
  }

  flush(): void {
    for (let s = 0; s < SECTORS; s++) this.put(s, this.newest(s), true);
  }
}

async function play(dev: CrashableBlockDevice, model: SectorModel, ops: Op[]): Promise<void> {
  for (const o of ops) {
    switch (o.op) {
      case 'write': {
        const data = pattern(o.count * SECTOR, o.seed);
        await dev.write(data, o.sector * SECTOR, { fua: o.fua });
        for (let i = 0; i < o.count; i++) {
          model.put(o.sector + i, data.subarray(i * SECTOR, (i + 1) * SECTOR), o.fua);
        }
        break;
      }
      case 'zero':
        await dev.writeZeroes(o.sector * SECTOR, o.count * SECTOR, { fua: o.fua });
        for (let i = 0; i < o.count; i++) model.put(o.sector + i, Buffer.alloc(SECTOR), o.fua);
        break;
      case 'discard':
        await dev.discard(o.sector * SECTOR, o.count * SECTOR);
        for (let i = 0; i < o.count; i++) model.put(o.sector + i, Buffer.alloc(SECTOR), false);
        break;
      case 'flush':
        await dev.flush();
        model.flush();
        break;
    }
  }
}

function sectorOf(img: MemoryBlockDevice, s: number): Buffer {
  const b = Buffer.alloc(SECTOR);
  img.readSync(b, s * SECTOR);
  return b;
}

test('after any power cut, durable data reads back exactly and the rest is old or new per sector', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(opArb, { maxLength: 40 }), fc.integer(), async (ops, seed) => {
      const dev = new CrashableBlockDevice(SIZE);
      const model = new SectorModel();
      await play(dev, model, ops);
      // Before the cut, reads see the newest data.
      for (let s = 0; s < SECTORS; s++) {
        const b = Buffer.alloc(SECTOR);
        await dev.read(b, s * SECTOR);
        assert.ok(b.equals(model.newest(s)), `sector ${s} reads its newest content before the cut`);
      }
      const after = dev.powerCut(seed);
      const image = Buffer.alloc(SIZE);
      await after.read(image, 0);
      for (let s = 0; s < SECTORS; s++) {
        const got = image.subarray(s * SECTOR, (s + 1) * SECTOR);
        const allowed = [model.floor[s] ?? Buffer.alloc(0), ...(model.since[s] ?? [])];
        assert.ok(
          allowed.some((a) => a.equals(got)),
          `sector ${s} after the cut is neither its durable content nor any later write (${allowed.length} allowed)`,
        );
        if (model.since[s]?.length === 0)
          assert.ok(got.equals(model.floor[s] ?? Buffer.alloc(0)), `sector ${s} was durable`);
      }
    }),
    { numRuns: 300 },
  );
});

test('the same seed gives the same image; different seeds give different ones', async () => {
  const dev = new CrashableBlockDevice(64 * SECTOR);
  for (let i = 0; i < 16; i++) await dev.write(pattern(8 * SECTOR, i), ((i * 5) % 57) * SECTOR);
  const images = new Set<string>();
  for (let seed = 0; seed < 20; seed++) {
    const a = Buffer.alloc(dev.size);
    const b = Buffer.alloc(dev.size);
    dev.crashImage(seed).readSync(a, 0);
    dev.crashImage(seed).readSync(b, 0);
    assert.ok(a.equals(b), `seed ${seed} replays`);
    images.add(a.toString('base64'));
  }
  assert.ok(images.size > 10, `20 seeds gave only ${images.size} distinct images`);
  // powerCut uses the same decision as crashImage.
  const expected = Buffer.alloc(dev.size);
  dev.crashImage(7).readSync(expected, 0);
  const after = dev.powerCut(7);
  const got = Buffer.alloc(dev.size);
  await after.read(got, 0);
  assert.ok(got.equals(expected));
});

test('writes are torn at sector granularity: some seeds keep part of a write', () => {
  const dev = new CrashableBlockDevice(64 * SECTOR);
  const data = pattern(64 * SECTOR, 1);
  void dev.write(data, 0);
  let torn = 0;
  for (let seed = 0; seed < 30; seed++) {
    const img = dev.crashImage(seed);
    let fresh = 0;
    for (let s = 0; s < 64; s++) {
      const got = sectorOf(img, s);
      const isNew = got.equals(data.subarray(s * SECTOR, (s + 1) * SECTOR));
      assert.ok(isNew || got.equals(Buffer.alloc(SECTOR)), `seed ${seed} sector ${s} is old or new`);
      if (isNew) fresh++;
    }
    if (fresh > 0 && fresh < 64) torn++;
  }
  assert.ok(torn > 3, `only ${torn} of 30 seeds tore the write`);
});

test('unaligned writes tear at absolute sector boundaries', () => {
  const dev = new CrashableBlockDevice(8 * SECTOR);
  const data = pattern(3 * SECTOR, 2);
  void dev.write(data, 300); // pieces: 300..512, 512..1024, 1024..1536, 1536..1836
  for (let seed = 0; seed < 40; seed++) {
    const img = Buffer.alloc(8 * SECTOR);
    dev.crashImage(seed).readSync(img, 0);
    const cuts = [300, 512, 1024, 1536, 1836];
    for (let i = 0; i + 1 < cuts.length; i++) {
      const [from = 0, to = 0] = [cuts[i], cuts[i + 1]];
      const piece = img.subarray(from, to);
      const isNew = piece.equals(data.subarray(from - 300, to - 300));
      assert.ok(isNew || piece.equals(Buffer.alloc(to - from)), `seed ${seed}: piece ${from}..${to} is whole`);
    }
  }
});

test('policies keep and drop are the extremes; FUA and flushed writes survive both', async () => {
  const dev = new CrashableBlockDevice(16 * SECTOR);
  await dev.write(pattern(SECTOR, 1), 0);
  await dev.flush();
  await dev.write(pattern(SECTOR, 2), 0); // volatile, over flushed data
  await dev.write(pattern(SECTOR, 3), SECTOR, { fua: true });
  await dev.write(pattern(SECTOR, 4), 2 * SECTOR);
  await dev.write(pattern(SECTOR, 5), 2 * SECTOR, { fua: true }); // FUA after a volatile write to the same sector
  await dev.write(pattern(SECTOR, 6), 2 * SECTOR); // ... and a volatile one after it
  assert.equal(dev.volatileWrites, 5);
  const durable = Buffer.alloc(SECTOR);
  dev.readDurable(durable, 0);
  assert.ok(durable.equals(pattern(SECTOR, 1)));
  const policies: [CrashPolicy, number[]][] = [
    ['keep', [2, 3, 6]],
    ['drop', [1, 3, 5]],
  ];
  for (const [policy, seeds] of policies) {
    const img = dev.crashImage(0, { policy });
    seeds.forEach((seed, s) => {
      assert.ok(sectorOf(img, s).equals(pattern(SECTOR, seed)), `${policy}: sector ${s} holds write ${seed}`);
    });
  }
});

test('after powerCut the old device is dead and the new one carries on', async () => {
  const dev = new CrashableBlockDevice(8 * SECTOR, { name: 'disk' });
  await dev.write(pattern(SECTOR, 1), 0, { fua: true });
  await dev.writeZeroes(SECTOR, SECTOR, { noHole: true });
  const next = dev.powerCut(1, { policy: 'drop' });
  await assert.rejects(dev.read(Buffer.alloc(1), 0), { code: 'EIO', message: /lost power/ });
  await assert.rejects(dev.write(Buffer.alloc(1), 0), { code: 'EIO' });
  await assert.rejects(dev.flush(), { code: 'EIO' });
  await assert.rejects(dev.blockStatus(0, 512), { code: 'EIO' });
  await dev.close();
  assert.equal(next.name, 'disk');
  assert.equal(next.volatileWrites, 0);
  const b = Buffer.alloc(SECTOR);
  await next.read(b, 0);
  assert.ok(b.equals(pattern(SECTOR, 1)));
  await next.write(pattern(SECTOR, 2), 0);
  await next.flush();
  const again = next.powerCut(2);
  await again.read(b, 0);
  assert.ok(b.equals(pattern(SECTOR, 2)));
  await again.discard(0, 4 * SECTOR);
  const z = Buffer.alloc(4 * SECTOR, 1);
  await again.read(z, 0);
  assert.ok(z.equals(Buffer.alloc(4 * SECTOR)), 'discarded sectors read as zeroes');
  assert.deepEqual(await again.blockStatus(0, 8 * SECTOR), [{ length: 8 * SECTOR, hole: false, zero: false }]);
  await again.close();
  await assert.rejects(again.read(b, 0), { code: 'ESHUTDOWN' });
});

test('a crashable device can start from an existing image, which it copies', async () => {
  const img = new MemoryBlockDevice(4 * SECTOR);
  img.writeSync(pattern(SECTOR, 9), SECTOR);
  const dev = new CrashableBlockDevice(img);
  await dev.write(pattern(SECTOR, 1), SECTOR, { fua: true });
  assert.ok(sectorOf(img, 1).equals(pattern(SECTOR, 9)), 'the source image is not modified');
  assert.ok(sectorOf(dev.crashImage(0), 1).equals(pattern(SECTOR, 1)));
  await assert.rejects(dev.write(Buffer.alloc(SECTOR), 4 * SECTOR), { code: 'ENOSPC' });
});
