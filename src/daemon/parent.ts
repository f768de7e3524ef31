// --exit-with-parent (nbdkit-captive(1)): serve shuts down, in order, when
// the process that started it exits. On Linux the kernel does the watching:
// prctl(PR_SET_PDEATHSIG, SIGTERM) through the native addon, so the usual
// SIGTERM path runs. Without the addon, the parent's pid is checked once a
// second (an orphan is re-parented, so getppid() changes).

import { loadNative } from '../blockdev/native.ts';
import { constants } from 'node:os';
import { errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';

/**
 * Arrange for `onParentGone` (or SIGTERM, which serve handles the same way)
 * when the parent exits. Returns a function that stops the fallback check.
 */
export function exitWithParent(onParentGone: () => void): () => void {
  const parent = process.ppid;
  const native = loadNative()?.setParentDeathSignal ?? null;
  if (native !== null) {
    try {
      native(constants.signals.SIGTERM);
      // The parent may have gone before the signal was asked for.
      if (process.ppid !== parent) onParentGone();
      return () => undefined;
    } catch (err) {
      log.warn(`--exit-with-parent: prctl failed (${errorMessage(err)}); checking the parent every second instead`);
    }
  }
  const timer = setInterval(() => {
    if (process.ppid !== parent) {
      clearInterval(timer);
      onParentGone();
    }
  }, 1000);
  timer.unref();
  return () => {
    clearInterval(timer);
  };
}
