// Where a one-shot command writes: the process's stdout and stderr, or, in
// tests, strings collected in memory.

export interface TextStream {
  isTTY?: boolean;
  write(text: string): unknown;
}

export interface Output {
  stdout: TextStream;
  stderr: TextStream;
}

export const processOutput: Output = { stdout: process.stdout, stderr: process.stderr };

export interface CapturedOutput extends Output {
  readonly out: string;
  readonly err: string;
}

/** An Output that keeps what is written (stderr may pretend to be a terminal). */
export function captureOutput(options: { tty?: boolean } = {}): CapturedOutput {
  let out = '';
  let err = '';
  return {
    stdout: {
      write(text: string) {
        out += text;
        return true;
      },
    },
    stderr: {
      isTTY: options.tty ?? false,
      write(text: string) {
        err += text;
        return true;
      },
    },
    get out() {
      return out;
    },
    get err() {
      return err;
    },
  };
}
