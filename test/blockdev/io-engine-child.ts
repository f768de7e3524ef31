// A child process for io-engine.test.ts: what must hold of a whole process
// (it exits when the engine is idle, stays alive while a request is in
// flight, which engine it picks) cannot be tested from inside the test's own.
//
//   node --import tsx io-engine-child.ts status
//       prints the engine's name and reason as JSON (or the error)
//   node --import tsx io-engine-child.ts idle FILE
//       one write and one read through the engine, then nothing: the
//       process must exit by itself
//   node --import tsx io-engine-child.ts pending FIFO
//       a read from FIFO that completes only when the parent writes to it:
//       the process must stay alive until then and print what it read

import { openSync } from 'node:fs';
import { ioEngine, ioEngineStatus } from '../../src/blockdev/io-engine.ts';
import { setLogLevel } from '../../src/util/log.ts';

setLogLevel('warn');
const [mode, path] = process.argv.slice(2);

function out(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

switch (mode ?? '') {
  case 'status': {
    try {
      out(ioEngineStatus());
    } catch (err) {
      out({ error: err instanceof Error ? err.message : String(err), code: (err as { code?: unknown }).code });
    }
    break;
  }
  case 'idle': {
    const engine = ioEngine();
    const fd = openSync(path ?? '', 'r+');
    const data = Buffer.from('the engine must not keep the process alive');
    const wrote = await engine.write(fd, data, 0);
    const back = Buffer.alloc(data.length);
    const read = await engine.read(fd, back, 0);
    out({ engine: engine.name, wrote, read, same: back.equals(data) });
    // No close, no timer: an idle ring's poll handle is unreferenced, so the loop ends here.
    break;
  }
  case 'pending': {
    const engine = ioEngine();
    const fd = openSync(path ?? '', 'r');
    const buf = Buffer.alloc(5);
    const reading = engine.read(fd, buf, -1);
    out({ engine: engine.name, waiting: true });
    const n = await reading;
    out({ read: n, text: buf.toString() });
    break;
  }
  default:
    process.stderr.write(`io-engine-child: unknown mode ${String(mode)}\n`);
    process.exitCode = 2;
}
