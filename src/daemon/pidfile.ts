// -P/--pidfile FILE, as nbdkit has it: the pid is written once serve is
// ready to accept connections (so a script that waits for the file can
// connect at once), replacing any old file, and the file is left in place at
// exit (nbdkit does not delete it either; a supervisor checks the pid). The
// write goes to a temporary name first and is renamed over FILE, so a
// reader never sees a half-written pid.

import { renameSync, unlinkSync, writeFileSync } from 'node:fs';

export function writePidfile(path: string, pid = process.pid): void {
  const tmp = `${path}.${pid}.tmp`;
  try {
    writeFileSync(tmp, `${pid}\n`, { mode: 0o644 });
    renameSync(tmp, path);
  } catch (err) {
    try {
      unlinkSync(tmp);
    } catch {
      // Never created.
    }
    throw err;
  }
}
