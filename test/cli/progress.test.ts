import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Progress } from '../../src/cli/progress.ts';

function clock(): { now: () => number; advance: (ms: number) => void } {
  let t = 1000;
  return { now: () => t, advance: (ms) => (t += ms) };
}

function stream(isTTY: boolean): { isTTY: boolean; text: string; write(s: string): boolean } {
  return {
    isTTY,
    text: '',
    write(s: string) {
      this.text += s;
      return true;
    },
  };
}

test('quick work shows nothing at all', () => {
  const c = clock();
  const s = stream(true);
  const p = new Progress('zeroing x', 100, { stream: s, now: c.now });
  for (let i = 0; i <= 100; i += 10) {
    p.update(i);
    c.advance(10);
  }
  p.finish();
  assert.equal(s.text, '');
});

test('slow work on a terminal draws a bar that ends at 100%', () => {
  const c = clock();
  const s = stream(true);
  const p = new Progress('zeroing x', 100, { stream: s, now: c.now });
  c.advance(600);
  p.update(50);
  assert.match(s.text, /^\rzeroing x \[#{15}\.{15}\] {2}50%$/);
  c.advance(50);
  p.update(60);
  assert.doesNotMatch(s.text, /60%/, 'at most ten redraws a second');
  c.advance(100);
  p.update(60);
  assert.match(s.text, / 60%$/);
  p.finish();
  assert.match(s.text, /\[#{30}\] 100%\n$/);
});

test('slow work into a file or pipe prints a line now and then', () => {
  const c = clock();
  const s = stream(false);
  const p = new Progress('zeroing x', 4, { stream: s, now: c.now });
  c.advance(600);
  p.update(1);
  c.advance(500);
  p.update(2);
  c.advance(2000);
  p.update(3);
  p.finish();
  assert.equal(s.text, 'zeroing x: 25%\nzeroing x: 75%\nzeroing x: done\n');
});
