// A small seeded pseudo-random generator for replayable simulations (power
// cuts, fault schedules): the same seed gives the same sequence on every
// machine and Node version, which Math.random cannot promise. Marsaglia's
// xorshift128 over four 32-bit words; statistically plenty for choosing which
// writes survive a crash, and not for anything cryptographic.

/** A 32-bit finaliser (an invertible mix): every input bit affects every output bit. */
function fmix(v: number): number {
  v = Math.imul(v ^ (v >>> 16), 0x85ebca6b);
  v = Math.imul(v ^ (v >>> 13), 0xc2b2ae35);
  return (v ^ (v >>> 16)) >>> 0;
}

export class Prng {
  private x: number;
  private y: number;
  private z: number;
  private w: number;

  constructor(seed: number) {
    if (!Number.isSafeInteger(seed)) throw new RangeError(`Prng: seed must be an integer, got ${seed}`);
    // Spread the seed over the state with a bijective integer hash: nearby seeds give
    // unrelated streams, and distinct seeds (the high word counts too) distinct states.
    const lo = seed >>> 0;
    const hi = Math.floor(seed / 0x1_0000_0000) >>> 0;
    this.x = fmix((lo + 0x9e3779b9) >>> 0);
    this.y = fmix((hi ^ this.x) >>> 0);
    this.z = fmix((this.y + 0x9e3779b9) >>> 0);
    this.w = fmix((this.z ^ 0x7f4a7c15) >>> 0) || 1; // an all-zero state would stay zero forever
  }

  /** The next 32-bit unsigned integer. */
  next(): number {
    const t = this.x ^ (this.x << 11);
    this.x = this.y;
    this.y = this.z;
    this.z = this.w;
    this.w = (this.w ^ (this.w >>> 19) ^ t ^ (t >>> 8)) >>> 0;
    return this.w;
  }

  /** A float in [0, 1). */
  float(): number {
    return this.next() / 0x1_0000_0000;
  }

  /** An integer in [0, n). */
  below(n: number): number {
    return Math.floor(this.float() * n);
  }

  bool(): boolean {
    return this.next() >= 0x8000_0000;
  }
}
