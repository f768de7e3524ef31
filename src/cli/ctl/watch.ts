// A live view's loop: draw a frame, wait the interval, again, until SIGINT
// (or SIGTERM) ends it (then it resolves) or a frame fails (then it rejects
// with that error: the daemon went away, say). The wait is a timer, cut
// short by the signal, so ^C ends the view at once.

export async function watchLoop(intervalMs: number, frame: () => Promise<void>): Promise<void> {
  let received = false;
  // A function, so that the checks after each await read what the handler set.
  const interrupted = (): boolean => received;
  let wake: (() => void) | undefined;
  const onSignal = (): void => {
    received = true;
    wake?.();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    while (!interrupted()) {
      await frame();
      if (interrupted()) break;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, intervalMs);
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      wake = undefined;
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/** SECONDS as given to --watch or --timeout: a positive number, fractions allowed. */
export function parseSeconds(option: string, text: string): number {
  const s = Number(text);
  if (text.trim() === '' || !Number.isFinite(s) || s <= 0) {
    throw new Error(`${option} ${text}: give a number of seconds greater than 0 (e.g. ${option} 2 or ${option} 0.5)`);
  }
  return s;
}
