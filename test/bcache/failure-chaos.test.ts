// A seeded, replayable chaos property (issue 6): random workloads (writes,
// FUA writes, flushes, reads, cache mode switches) through a real NBD client
// on bcache0, with one fault injected at a random point (cache pulled, the
// cache journal range failing, the backing device failing its Nth I/O, the
// backing device pulled), next to an independent set and device that keeps
// a workload of its own. After each run: the retire (if any) is bounded,
// no worker of a dead set lives, nothing is left in the process, the
// surviving devices read back as the model says, and after a restart of
// the images every write covered by a completed FLUSH or FUA is where it
// belongs (dirty data on the cache when the backing device failed).
//
// Replay: UBCACHE_CHAOS_SEED=<seed> (printed at the start) and, for one
// failing case, the path fast-check prints, in UBCACHE_CHAOS_PATH.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { Cmd } from '../../src/nbd/protocol.ts';
import { assertQuiet, checkRetired, collected, makeRig, restart, within, type Rig } from './failure-rig.ts';
import { pattern } from './request-helpers.ts';

const S = 512;
const SECTORS = 1024;
const seed = Number(process.env['UBCACHE_CHAOS_SEED'] ?? 0x6b1d);
const path = process.env['UBCACHE_CHAOS_PATH'];
const numRuns = Number(process.env['UBCACHE_CHAOS_RUNS'] ?? 25);

type Op =
  | { kind: 'write' | 'fua'; sector: number; sectors: number; tag: number }
  | { kind: 'flush' }
  | { kind: 'read'; sector: number; sectors: number }
  | { kind: 'mode'; mode: 0 | 1 };
type Fault = 'cache-pull' | 'journal' | 'backing-nth' | 'backing-pull';

const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc.record({
    kind: fc.constantFrom('write' as const, 'fua' as const),
    sector: fc.nat(SECTORS / 8 - 8).map((n) => n * 8),
    sectors: fc.integer({ min: 1, max: 8 }).map((n) => n * 8),
    tag: fc.nat(1000),
  }),
  fc.constant({ kind: 'flush' as const }),
  fc.record({
    kind: fc.constant('read' as const),
    sector: fc.nat(SECTORS / 8 - 8).map((n) => n * 8),
    sectors: fc.integer({ min: 1, max: 8 }).map((n) => n * 8),
  }),
  fc.record({ kind: fc.constant('mode' as const), mode: fc.constantFrom(0 as const, 1 as const) }),
);

/**
 * A sector-granular model: the bytes a sector must read back as, or
 * undefined once a failed write left it old-or-new. `durable` is the
 * content a restart must find (set by completed FLUSH/FUA).
 */
class Model {
  readonly now = new Map<number, Buffer | undefined>();
  readonly durable = new Map<number, Buffer | undefined>();
  private pending = new Set<number>();

  write(sector: number, data: Buffer, ok: boolean, fua: boolean): void {
    for (let i = 0; i < data.length / S; i++) {
      const s = sector + i;
      const d = ok ? Buffer.from(data.subarray(i * S, (i + 1) * S)) : undefined;
      this.now.set(s, d);
      if (ok && fua) {
        this.durable.set(s, d);
        this.pending.delete(s);
      } else {
        // Not yet flushed (or failed): a restart may find the old or the new content.
        this.durable.set(s, undefined);
        if (ok) this.pending.add(s);
      }
    }
  }

  flushed(): void {
    for (const s of this.pending) this.durable.set(s, this.now.get(s));
    this.pending.clear();
  }

  /** Sectors known with their expected content ([] zero-filled when never written). */
  check(map: Map<number, Buffer | undefined>, sector: number, got: Buffer, what: string): void {
    for (let i = 0; i < got.length / S; i++) {
      const s = sector + i;
      const want = map.has(s) ? map.get(s) : Buffer.alloc(S);
      if (want === undefined) continue;
      assert.ok(got.subarray(i * S, (i + 1) * S).equals(want), `${what}: sector ${s}`);
    }
  }
}

async function runOps(rig: Rig, ops: Op[], faultAt: number, fault: Fault, model: Model, other: Model): Promise<void> {
  const f = { faulted: false };
  const inject = (): void => {
    f.faulted = true;
    switch (fault) {
      case 'cache-pull':
        rig.cache.pull();
        break;
      case 'journal': {
        const ring = rig.set.cs.journal.ring;
        const bucketBytes = rig.set.cs.bucketSize * S;
        const first = Math.min(...ring);
        rig.cache.failRange(first * bucketBytes, (Math.max(...ring) - first + 1) * bucketBytes, { ops: ['write'] });
        break;
      }
      case 'backing-nth':
        rig.backing.failNth(1 + (faultAt % 3));
        break;
      case 'backing-pull':
        rig.backing.pull();
        break;
    }
  };
  for (const [i, op] of ops.entries()) {
    if (i === faultAt) inject();
    const c = rig.client;
    // The bystander runs the same workload on its own set; it must never fail.
    switch (op.kind) {
      case 'write':
      case 'fua': {
        const data = pattern(op.tag, op.sector, op.sectors);
        const flags = op.kind === 'fua' ? 1 : 0;
        const [r, o] = await Promise.all([
          c.writeAt(op.sector * S, data, flags),
          rig.otherClient.writeAt(op.sector * S, data, flags),
        ]);
        model.write(op.sector, data, r.error === 0, op.kind === 'fua');
        assert.equal(o.error, 0, 'the other device takes writes');
        other.write(op.sector, data, true, op.kind === 'fua');
        break;
      }
      case 'flush': {
        const [r, o] = await Promise.all([
          c.request({ type: Cmd.FLUSH, offset: 0, length: 0 }),
          rig.otherClient.request({ type: Cmd.FLUSH, offset: 0, length: 0 }),
        ]);
        if (r.error === 0) model.flushed();
        assert.equal(o.error, 0, 'the other device flushes');
        other.flushed();
        break;
      }
      case 'read': {
        const [r, o] = await Promise.all([
          c.readAt(op.sector * S, op.sectors * S),
          rig.otherClient.readAt(op.sector * S, op.sectors * S),
        ]);
        if (r.error === 0 && r.data) model.check(model.now, op.sector, r.data, 'bcache0 read');
        else assert.ok(f.faulted, 'reads fail only after a fault');
        assert.equal(o.error, 0);
        assert.ok(o.data);
        other.check(other.now, op.sector, o.data, 'bcache1 read');
        break;
      }
      case 'mode':
        // Its superblock write may meet the fault (as the kernel's store would fail); never before it.
        if (!rig.dev.stopped && rig.dev.attached) {
          await rig.dev.setCacheMode(op.mode).catch((err: unknown) => {
            if (!f.faulted) throw err;
          });
        }
        break;
    }
  }
  if (!f.faulted) inject();
}

/** Wait for the retire a fault may have started (it may not: a backing fault, or an error below the limit). */
async function settle(rig: Rig): Promise<boolean> {
  // The journal flusher or a request notices a cache fault: give the set a reason to touch the cache.
  if (rig.set.retired === undefined && !rig.set.cs.ioDisabled) {
    await rig.client.request({ type: Cmd.FLUSH, offset: 0, length: 0 });
  }
  if (rig.set.retired === undefined) return false;
  await within(10_000, 'the retire', rig.set.retired);
  return true;
}

test(`chaos: random workloads and faults keep every invariant (seed ${seed}, UBCACHE_CHAOS_SEED to replay)`, async () => {
  console.error(`failure-chaos: seed ${seed}${path ? `, path ${path}` : ''}, ${numRuns} runs`);
  await fc.assert(
    fc.asyncProperty(
      fc.array(opArb, { minLength: 4, maxLength: 30 }),
      fc.nat(30),
      fc.constantFrom<Fault>('cache-pull', 'journal', 'backing-nth', 'backing-pull'),
      fc.boolean(),
      async (ops, faultAt, fault, writeback) => {
        const rig = await makeRig({
          settings: { writebackRunning: false },
          backingOfflineMs: 200,
          backingProbeMs: 20,
        });
        const model = new Model();
        const other = new Model();
        try {
          if (writeback) await rig.dev.setCacheMode(1);
          await runOps(rig, ops, faultAt, fault, model, other);
          const didRetire = await settle(rig);
          if (didRetire) await checkRetired(rig);
          // A surviving bcache0 reads back as the model says.
          if (!rig.dev.stopped) {
            const r = await rig.client.readAt(0, SECTORS * S);
            if (r.error === 0 && r.data) model.check(model.now, 0, r.data, 'bcache0 after the fault');
          }
          const o = await rig.otherClient.readAt(0, SECTORS * S);
          assert.equal(o.error, 0);
          assert.ok(o.data);
          other.check(other.now, 0, o.data, 'bcache1 after the fault');
          const ref = didRetire ? rig.forgetSet() : undefined;
          await rig.close();
          await assertQuiet();
          if (ref) assert.ok(await collected(ref), 'the retired set was collected');
        } catch (err) {
          // fast-check reports the counterexample; this says what broke.
          console.error(
            `failure-chaos: ${fault} at op ${faultAt}: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`,
          );
          await rig.close().catch(() => undefined);
          throw err;
        }
        // Restart over the images: flushed data is where it belongs.
        const again = await restart([rig.cacheMem, rig.backingMem]);
        try {
          const d = again.devices.find((x) => x.name === 'bcache0') ?? again.devices[0];
          if (d?.running) {
            const buf = Buffer.alloc(SECTORS * S);
            await d.device.read(buf, 0);
            model.check(model.durable, 0, buf, 'bcache0 after a restart');
          } else {
            // Only a dirty device whose cache is gone may refuse to run; here the cache image is always there.
            assert.fail(`bcache0 did not run after a restart (${d?.stateName ?? 'missing'})`);
          }
        } finally {
          await again.close();
        }
      },
    ),
    { seed, numRuns, ...(path !== undefined ? { path } : {}), endOnFailure: true },
  );
});
