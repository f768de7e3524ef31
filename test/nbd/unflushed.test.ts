import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { UnflushedLog, type UnflushedExtent } from '../../src/nbd/unflushed.ts';

// The log against a byte-by-byte model: for every byte, the newest acknowledged
// content that is not yet durable (data byte, zero, trim) and its sequence.

type Op =
  | { op: 'data'; start: number; bytes: number[] }
  | { op: 'zero'; start: number; length: number; noHole: boolean }
  | { op: 'trim'; start: number; length: number }
  | { op: 'fua'; start: number; length: number }
  | { op: 'flush'; back: number };

const SPAN = 96;

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 5,
    arbitrary: fc.record({
      op: fc.constant('data' as const),
      start: fc.nat(SPAN - 1),
      bytes: fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 1, maxLength: 24 }),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      op: fc.constant('zero' as const),
      start: fc.nat(SPAN - 1),
      length: fc.integer({ min: 1, max: 24 }),
      noHole: fc.boolean(),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      op: fc.constant('trim' as const),
      start: fc.nat(SPAN - 1),
      length: fc.integer({ min: 1, max: 24 }),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      op: fc.constant('fua' as const),
      start: fc.nat(SPAN - 1),
      length: fc.integer({ min: 1, max: 24 }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('flush' as const), back: fc.nat(6) }) },
);

type Cell =
  | { kind: 'data'; byte: number; seq: number }
  | { kind: 'zero'; noHole: boolean; seq: number }
  | { kind: 'trim'; seq: number };

function render(extents: readonly UnflushedExtent[]): Map<number, string> {
  const out = new Map<number, string>();
  let prevEnd = -1;
  for (const e of extents) {
    assert.ok(e.start < e.end, 'no empty extent');
    assert.ok(e.start >= prevEnd, 'sorted and not overlapping');
    prevEnd = e.end;
    if (e.kind === 'data') assert.equal(e.data?.length, e.end - e.start, 'data of the extent length');
    for (let p = e.start; p < e.end; p++) {
      const v = e.kind === 'data' ? `d${e.data?.[p - e.start]}` : e.kind === 'zero' ? `z${e.noHole ? 1 : 0}` : 't';
      out.set(p, v);
    }
  }
  return out;
}

function replayMatchesModel(ops: Op[]): void {
  const log = new UnflushedLog();
  const model = new Map<number, Cell>();
  let seq = 0;
  let held = 0;
  for (const o of ops) {
    if (o.op === 'data') {
      const buf = Buffer.from(o.bytes);
      log.putData(o.start, buf, ++seq);
      buf.fill(0xee); // the caller reuses its buffer: the log must have copied it
      held += o.bytes.length;
      o.bytes.forEach((b, i) => model.set(o.start + i, { kind: 'data', byte: b, seq }));
    } else if (o.op === 'zero') {
      log.putZero(o.start, o.length, o.noHole, ++seq);
      for (let p = o.start; p < o.start + o.length; p++) model.set(p, { kind: 'zero', noHole: o.noHole, seq });
    } else if (o.op === 'trim') {
      log.putTrim(o.start, o.length, ++seq);
      for (let p = o.start; p < o.start + o.length; p++) model.set(p, { kind: 'trim', seq });
    } else if (o.op === 'fua') {
      log.clear(o.start, o.length);
      for (let p = o.start; p < o.start + o.length; p++) model.delete(p);
    } else {
      const mark = Math.max(0, seq - o.back);
      log.dropUpTo(mark);
      for (const [p, c] of model) if (c.seq <= mark) model.delete(p);
    }
  }
  const want = new Map<number, string>();
  for (const [p, c] of model)
    want.set(p, c.kind === 'data' ? `d${c.byte}` : c.kind === 'zero' ? `z${c.noHole ? 1 : 0}` : 't');
  assert.deepEqual(render(log.snapshot()), want);
  // Bytes held: at most what was written, and nothing once everything is flushed.
  assert.ok(log.bytes <= held);
  log.dropUpTo(seq);
  assert.equal(log.bytes, 0);
  assert.equal(log.size, 0);
  assert.deepEqual(log.snapshot(), []);
}

test('the log replays the newest unflushed content of every byte, whatever the order of writes, FUAs and flushes', () => {
  fc.assert(fc.property(fc.array(opArb, { maxLength: 60 }), replayMatchesModel), { numRuns: 2000 });
});

test('the same over thousands of entries: the slots move down and grow while entries stay live', () => {
  // Long runs cross the log's slot capacity (1024) many times, with flushes that keep a tail live.
  // Flushes that leave hundreds of writes unflushed, so slots stay live past the end of the arrays.
  const longOpArb = fc.oneof(
    { weight: 30, arbitrary: opArb.filter((o) => o.op !== 'flush') },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('flush' as const), back: fc.integer({ min: 1, max: 900 }) }) },
  );
  fc.assert(fc.property(fc.array(longOpArb, { minLength: 1500, maxLength: 5000 }), replayMatchesModel), {
    numRuns: 25,
  });
});

test('a flush drops exactly the writes acknowledged up to its mark, and the bytes they held', () => {
  const log = new UnflushedLog();
  for (let i = 0; i < 3000; i++) log.putData((i % 100) * 4096, Buffer.alloc(4096, i & 0xff), i + 1);
  assert.equal(log.bytes, 3000 * 4096, 'an overwritten range is held once per write until a flush');
  log.dropUpTo(2900);
  assert.equal(log.size, 100);
  assert.equal(log.bytes, 100 * 4096);
  const snap = log.snapshot();
  assert.equal(snap.length, 100);
  for (const e of snap) assert.equal(e.data?.[0], (2900 + e.start / 4096) & 0xff);
  // A write larger than a slab piece is held too.
  log.putData(0, Buffer.alloc(1 << 20, 7), 3001);
  assert.equal(log.bytes, 100 * 4096 + (1 << 20));
  assert.equal(log.snapshot()[0]?.data?.[12345], 7);
});

test('slabs given back by a flush are reused without touching data still held', () => {
  const log = new UnflushedLog();
  const want = new Map<number, number>();
  let seq = 0;
  // Rounds of 4 KiB writes over 2000 blocks (several 1 MiB slabs each), each round dropping part of the log.
  for (let round = 0; round < 6; round++) {
    for (let i = 0; i < 700; i++) {
      const block = (round * 389 + i * 7) % 2000;
      const fill = (round * 31 + i) & 0xff;
      log.putData(block * 4096, Buffer.alloc(4096, fill), ++seq);
      want.set(block, seq * 256 + fill);
    }
    const mark = seq - 250 * (round % 3);
    log.dropUpTo(mark);
    for (const [block, v] of want) if (Math.floor(v / 256) <= mark) want.delete(block);
    const snap = log.snapshot();
    assert.equal(snap.length, want.size, `round ${round}: one extent per block still unflushed`);
    for (const e of snap) {
      const v = want.get(e.start / 4096);
      assert.ok(v !== undefined, `round ${round}: block ${e.start / 4096} was flushed`);
      const data = e.data as Buffer;
      assert.ok(
        data.every((b) => b === (v & 0xff)),
        `round ${round}: block ${e.start / 4096} holds its last write`,
      );
    }
  }
});

test('writes larger than a slab piece keep their data while the slots move', () => {
  const log = new UnflushedLog();
  let seq = 0;
  // 96 KiB writes (over the 64 KiB slab piece) among small ones, flushes keeping the newest 600 entries.
  for (let i = 0; i < 5000; i++) {
    const big = i % 250 === 0;
    const at = big ? 1_000_000_000 + (i / 250) * 98304 : (i % 3000) * 512;
    log.putData(at, Buffer.alloc(big ? 98304 : 512, (i * 13) & 0xff), ++seq);
    if (i % 700 === 699) log.dropUpTo(seq - 600);
  }
  const bigs = log.snapshot().filter((e) => e.start >= 1_000_000_000);
  // Writes 4500 and 4750 are among the last 600 acknowledged before the last flush, or after it.
  assert.deepEqual(
    bigs.map((e) => [e.start, e.end - e.start]),
    [4500, 4750].map((i) => [1_000_000_000 + (i / 250) * 98304, 98304]),
  );
  for (const e of bigs) {
    const i = ((e.start - 1_000_000_000) / 98304) * 250;
    assert.ok(
      e.data?.every((b) => b === ((i * 13) & 0xff)),
      `write ${i} keeps its data`,
    );
  }
});
