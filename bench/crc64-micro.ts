// CRC-64/WE throughput (bcache's metadata checksum): `node --import tsx bench/crc64-micro.ts`.
// A measurement, not a test: on a loaded machine the figure drops, and that says nothing about correctness.
import { bchCrc64 } from '../src/format/crc64.ts';

const buf = Buffer.alloc(64 << 20, 0x5a);
bchCrc64(buf.subarray(0, 1 << 20));
const t0 = process.hrtime.bigint();
bchCrc64(buf);
const ms = Number(process.hrtime.bigint() - t0) / 1e6;
console.log(`CRC-64/WE: ${(64 / (ms / 1000)).toFixed(0)} MiB/s over 64 MiB`);
