import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  FaultHold,
  FaultyBlockDevice,
  FAULT_OPS,
  describeRule,
  parseFaultSpec,
  type FaultRuleSpec,
} from '../../src/blockdev/faulty.ts';
import { FileBlockDevice } from '../../src/blockdev/file.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { openBlockDevice } from '../../src/blockdev/open.ts';
import type { BlockDevice } from '../../src/blockdev/types.ts';
import { pattern, sparseFile, tempDir } from './helpers.ts';

const tmp = tempDir();
after(() => {
  tmp.remove();
});

function setup(size = 1 << 20): { mem: MemoryBlockDevice; dev: FaultyBlockDevice } {
  const mem = new MemoryBlockDevice(size);
  return { mem, dev: new FaultyBlockDevice(mem) };
}

function block(seed: number): Buffer {
  return pattern(4096, seed);
}

async function contentAt(d: BlockDevice, offset: number, length = 4096): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await d.read(b, offset);
  return b;
}

/** Whether a promise has settled by the time pending microtasks and one macrotask turn have run. */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  p.then(
    () => (done = true),
    () => (done = true),
  );
  await new Promise((resolve) => setImmediate(resolve));
  return done;
}

test('failNth fails exactly the Nth matching I/O, once, before it reaches the device', async () => {
  const { mem, dev } = setup();
  const rule = dev.failNth(3, { ops: ['write'] });
  await dev.read(Buffer.alloc(512), 0); // not a write: not counted
  await dev.write(block(1), 0);
  await dev.write(block(2), 4096);
  await assert.rejects(dev.write(block(3), 8192), {
    code: 'EIO',
    message: /injected EIO on write at 8192\+4096 \(rule fail-nth=3:write\)/,
  });
  await dev.write(block(4), 12288);
  assert.ok((await contentAt(mem, 8192)).equals(Buffer.alloc(4096)), 'the failed write never reached the device');
  assert.ok((await contentAt(mem, 12288)).equals(block(4)));
  assert.equal(rule.matched, 4);
  assert.equal(rule.injected, 1);
  const c = dev.counters();
  assert.equal(c.ops.write, 4);
  assert.equal(c.ops.read, 1);
  assert.equal(c.injected.write, 1);
  assert.equal(c.injected.read, 0);
});

test('failNth with persist fails the Nth and every later matching I/O, with the configured code', async () => {
  const { dev } = setup();
  dev.failNth(2, { ops: ['flush'], persist: true, code: 'ENOSPC' });
  await dev.flush();
  await assert.rejects(dev.flush(), { code: 'ENOSPC' });
  await assert.rejects(dev.flush(), { code: 'ENOSPC' });
  await dev.write(block(1), 0); // writes are not matched
  assert.equal(dev.counters().injected.flush, 2);
});

test('failRange fails only I/O overlapping the range (e.g. the journal), never a flush', async () => {
  const { mem, dev } = setup();
  const journal = dev.failRange(64 * 1024, 64 * 1024, { ops: ['write', 'zero', 'discard'] });
  await dev.write(block(1), 60 * 1024); // ends at 64 KiB: no overlap
  await assert.rejects(dev.write(block(2), 62 * 1024), { code: 'EIO' }); // straddles the start
  await assert.rejects(dev.write(block(3), 124 * 1024), { code: 'EIO' }); // ends at the end of the range
  await dev.write(block(4), 128 * 1024); // starts at the end: no overlap
  await assert.rejects(dev.writeZeroes(0, 1 << 20), { code: 'EIO' });
  await assert.rejects(dev.discard(100 * 1024, 1), { code: 'EIO' });
  await dev.read(Buffer.alloc(4096), 64 * 1024); // reads are not matched
  await dev.flush();
  assert.equal(journal.injected, 4);
  journal.remove();
  await dev.write(block(5), 64 * 1024);
  assert.ok((await contentAt(mem, 64 * 1024)).equals(block(5)), 'a removed rule no longer fails anything');
});

test('an "after" rule lets the write land and reports a failure anyway', async () => {
  const { mem, dev } = setup();
  dev.failNth(1, { ops: ['write'], after: true });
  await assert.rejects(dev.write(block(9), 0), { code: 'EIO', message: /after the I\/O was done/ });
  assert.ok((await contentAt(mem, 0)).equals(block(9)));
});

test('pull: every kind of I/O fails until restore()', async () => {
  const { dev } = setup();
  dev.pull();
  assert.equal(dev.pulled, true);
  const ops = [
    () => dev.read(Buffer.alloc(512), 0),
    () => dev.write(block(1), 0),
    () => dev.flush(),
    () => dev.discard(0, 4096),
    () => dev.writeZeroes(0, 4096),
    () => dev.blockStatus(0, 4096),
  ];
  for (const op of ops) await assert.rejects(op(), { code: 'EIO', message: /device pulled/ });
  assert.deepEqual(
    dev.counters().injected,
    Object.fromEntries(FAULT_OPS.map((o) => [o, 1])),
    'one injected failure of each kind',
  );
  dev.restore();
  for (const op of ops) await op();
});

test('pullAfter lets N I/Os through, then pulls the device for good', async () => {
  const { dev } = setup();
  dev.pullAfter(3, { code: 'ESHUTDOWN' });
  await dev.write(block(1), 0);
  await dev.read(Buffer.alloc(10), 0);
  await dev.flush();
  assert.equal(dev.pulled, false);
  await assert.rejects(dev.read(Buffer.alloc(10), 0), { code: 'ESHUTDOWN' });
  assert.equal(dev.pulled, true);
  await assert.rejects(dev.flush(), { code: 'ESHUTDOWN' });
});

test('latency delays matching I/O by at least the configured time', async () => {
  const { dev } = setup();
  dev.addLatency(30, { ops: ['read'] });
  const t0 = performance.now();
  await dev.read(Buffer.alloc(512), 0);
  const waited = performance.now() - t0;
  assert.ok(waited >= 29, `read took ${waited.toFixed(1)} ms`);
});

test('hold blocks matching I/O before the device until release()', async () => {
  const { mem, dev } = setup();
  const hold = dev.hold({ ops: ['write'], range: { offset: 0, length: 4096 } });
  const w = dev.write(block(1), 0);
  const other = dev.write(block(2), 8192); // outside the range: not held
  await hold.waitForHeld(1);
  await other;
  assert.equal(hold.held, 1);
  assert.equal(await settled(w), false, 'the held write has not completed');
  assert.ok((await contentAt(mem, 0)).equals(Buffer.alloc(4096)), 'nor reached the device');
  hold.release();
  await w;
  assert.ok((await contentAt(mem, 0)).equals(block(1)));
  assert.equal(hold.held, 0);
  await dev.write(block(3), 0); // released holds hold nothing more
});

test('a device pulled while I/O is held fails that I/O when it is released: the "blocked in I/O" case', async () => {
  const { mem, dev } = setup();
  const hold = dev.hold({ ops: ['write', 'flush'] });
  const w = dev.write(block(1), 0);
  const f = dev.flush();
  await hold.waitForHeld(2);
  dev.pull();
  hold.release();
  await assert.rejects(w, { code: 'EIO', message: /device pulled/ });
  await assert.rejects(f, { code: 'EIO' });
  assert.ok((await contentAt(mem, 0)).equals(Buffer.alloc(4096)), 'nothing reached the device');
});

test('close fails held and delayed I/O with ESHUTDOWN instead of hanging, then closes the inner device', async () => {
  const { mem, dev } = setup();
  const hold = dev.hold({ ops: ['write'] });
  dev.addLatency(60_000, { ops: ['read'] });
  const w = dev.write(block(1), 0);
  const r = dev.read(Buffer.alloc(512), 0);
  await hold.waitForHeld();
  const closing = dev.close();
  await assert.rejects(w, { code: 'ESHUTDOWN' });
  await assert.rejects(r, { code: 'ESHUTDOWN' });
  await closing;
  await assert.rejects(mem.read(Buffer.alloc(1), 0), { code: 'ESHUTDOWN' }, 'the inner device was closed');
  await assert.rejects(dev.flush(), { code: 'ESHUTDOWN' });
});

test('clearRules releases holds, removes every rule and restores a pulled device', async () => {
  const { dev } = setup();
  const hold = dev.hold();
  dev.failAlways({ ops: ['read'] });
  const w = dev.write(block(1), 0);
  await hold.waitForHeld();
  dev.pull();
  dev.clearRules();
  await w; // released into a device that is plugged back in
  assert.equal(dev.activeRules.length, 0);
  assert.equal(dev.pulled, false);
  await dev.read(Buffer.alloc(1), 0);
});

test('the faulty device passes geometry and caps through', async () => {
  const { mem, dev } = setup(123 * 512);
  assert.equal(dev.size, mem.size);
  assert.equal(dev.logicalBlockSize, mem.logicalBlockSize);
  assert.equal(dev.readOnly, false);
  assert.equal(dev.caps, mem.caps);
  assert.match(dev.name, /^faulty:memory:/);
  assert.deepEqual(await dev.blockStatus(0, 512), await mem.blockStatus(0, 512));
  await dev.close();
});

// ---- spec strings ------------------------------------------------------------

test('parseFaultSpec: the documented forms', () => {
  assert.deepEqual(parseFaultSpec('fail-nth=100:write'), [
    { action: { kind: 'fail', from: 100, once: true, code: 'EIO', after: false }, ops: ['write'] },
  ]);
  assert.deepEqual(parseFaultSpec('fail-range=4m+1m:write/zero:ENOSPC'), [
    {
      action: { kind: 'fail', from: 1, once: false, code: 'ENOSPC', after: false },
      ops: ['write', 'zero'],
      range: { offset: 4 << 20, length: 1 << 20 },
    },
  ]);
  assert.deepEqual(parseFaultSpec(' pull-after=0x10 , latency=500us:read , fail-from=2s:flush:after'), [
    { action: { kind: 'pull-after', count: 16, code: 'EIO' } },
    { action: { kind: 'latency', ms: 0.5 }, ops: ['read'] },
    { action: { kind: 'fail', from: 1024, once: false, code: 'EIO', after: true }, ops: ['flush'] },
  ]);
  assert.deepEqual(parseFaultSpec('fail:blockstatus:range=8s+1s:eperm'), [
    {
      action: { kind: 'fail', from: 1, once: false, code: 'EPERM', after: false },
      ops: ['blockStatus'],
      range: { offset: 4096, length: 512 },
    },
  ]);
});

test('parseFaultSpec: mistakes are explained, with the grammar', () => {
  const bad: [string, RegExp][] = [
    ['', /no rules given/],
    ['fail-nth=0', /at least 1/],
    ['fail-nth', /needs a value/],
    ['fail-nth=ten', /"ten" is not a number/],
    ['fail=3', /did you mean fail-nth=3/],
    ['explode=1', /unknown action "explode"/],
    ['fail-nth=1:writes', /unknown qualifier "writes"/],
    ['fail-range=100', /must be OFFSET\+LENGTH/],
    ['fail-range=100+0', /is empty/],
    ['latency=5', /must be a number with us, ms or s/],
    ['latency=5ms:after', /only applies to fail rules/],
    ['latency=5ms:EIO', /injects no error/],
    ['fail-range=0+1:range=0+1', /already has a range/],
  ];
  for (const [spec, why] of bad) {
    assert.throws(
      () => parseFaultSpec(spec),
      (err: unknown) => {
        assert.ok(err instanceof Error);
        assert.match(err.message, why, spec);
        assert.match(err.message, /actions: fail-nth=N/, 'the grammar is in the message');
        return true;
      },
    );
  }
});

test('describeRule and parseFaultSpec round-trip', () => {
  const codes = ['EIO', 'ENOSPC', 'EPERM', 'EINVAL', 'ENOTSUP', 'ESHUTDOWN', 'ENOMEM', 'EOVERFLOW'] as const;
  const ops = fc.option(fc.uniqueArray(fc.constantFrom(...FAULT_OPS), { minLength: 1 }), { nil: undefined });
  const range = fc.option(fc.record({ offset: fc.nat(), length: fc.integer({ min: 1, max: 2 ** 40 }) }), {
    nil: undefined,
  });
  const action = fc.oneof(
    fc.record({
      kind: fc.constant('fail' as const),
      from: fc.integer({ min: 1, max: 1e6 }),
      once: fc.boolean(),
      code: fc.constantFrom(...codes),
      after: fc.boolean(),
    }),
    fc.record({ kind: fc.constant('pull-after' as const), count: fc.nat(), code: fc.constantFrom(...codes) }),
    fc.record({ kind: fc.constant('latency' as const), ms: fc.integer({ min: 0, max: 10_000 }) }),
  );
  fc.assert(
    fc.property(action, ops, range, (a, o, r) => {
      // fast-check's records have null prototypes; deepEqual would see that
      const rule: FaultRuleSpec = { action: { ...a } };
      if (o !== undefined) rule.ops = o;
      if (r !== undefined) rule.range = { ...r };
      // fail-from=1 is printed as "fail", which parses back as the same rule
      assert.deepEqual(parseFaultSpec(describeRule(rule)), [rule]);
    }),
  );
});

test('openBlockDevice builds a faulty device from faulty:RULES@SPEC', async () => {
  const path = sparseFile(tmp.path('f.img'), 1 << 20);
  const dev = await openBlockDevice(`faulty:fail-nth=2:write,latency=1ms:read@${path}`);
  assert.ok(dev instanceof FaultyBlockDevice);
  assert.ok(dev.inner instanceof FileBlockDevice);
  assert.equal(dev.activeRules.length, 2);
  await dev.write(block(1), 0);
  await assert.rejects(dev.write(block(2), 0), { code: 'EIO' });
  assert.ok((await contentAt(dev, 0)).equals(block(1)));
  await dev.close();
  await assert.rejects(openBlockDevice(`faulty:fail-nth=x@${path}`), /not a number/);
  await assert.rejects(openBlockDevice(`faulty:fail-nth=1`), /faulty:RULES@DEVICE/);
  const nested = await openBlockDevice(`faulty:latency=1ms@faulty:fail:read@file:${path}`, { readOnly: true });
  await assert.rejects(nested.read(Buffer.alloc(1), 0), { code: 'EIO' });
  await nested.close();
});

test('parseFaultSpec: hold, an I/O that never answers until the device is closed', async () => {
  const rules = parseFaultSpec('hold:read');
  assert.deepEqual(rules, [{ action: { kind: 'hold' }, ops: ['read'] }]);
  assert.equal(describeRule(rules[0] as FaultRuleSpec), 'hold:read');
  assert.throws(() => parseFaultSpec('hold=1'), /"hold" takes no value/);
  assert.throws(() => parseFaultSpec('hold:EIO'), /injects no error/);
  assert.throws(() => parseFaultSpec('hold:after'), /only applies to fail rules/);
  // As --fault gives it: a read waits until close, then fails; writes pass.
  const dev = new FaultyBlockDevice(new MemoryBlockDevice(1 << 20), { rules });
  const read = dev.read(Buffer.alloc(4096), 0);
  await dev.write(Buffer.alloc(4096, 1), 4096);
  const hold = dev.activeRules[0];
  assert.ok(hold instanceof FaultHold);
  await hold.waitForHeld(1);
  await dev.close();
  await assert.rejects(read, { code: 'ESHUTDOWN' });
});
