// Pull-style reading from a socket: `await reader.read(n)` for exactly n
// bytes. The handshake is a conversation (ask, wait, answer), which reads best
// as awaits; the transmission phase parses pushed chunks instead (see
// transmission.ts) and takes over whatever this reader had buffered.

import type { Socket } from 'node:net';

/** The peer closed the connection (or it failed) while a read was waiting. */
export class ConnectionClosed extends Error {
  constructor(message = 'connection closed by the peer', options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ConnectionClosed';
  }
}

interface Waiter {
  want: number;
  resolve: () => void;
  reject: (err: Error) => void;
}

export interface SocketReaderOptions {
  /** Pause the socket while more than this many bytes are buffered and unread (a flood cannot fill memory). */
  highWaterMark?: number;
}

export class SocketReader {
  private readonly socket: Socket;
  private readonly highWaterMark: number;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: Waiter | undefined;
  private failure: Error | undefined;
  private paused = false;
  private attached = true;

  private readonly onData = (chunk: Buffer): void => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.buffered > this.highWaterMark && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
    this.wake();
  };
  private readonly onEnd = (): void => {
    this.fail(new ConnectionClosed());
  };
  private readonly onError = (err: Error): void => {
    this.fail(new ConnectionClosed(`connection failed: ${err.message}`, { cause: err }));
  };

  constructor(socket: Socket, options: SocketReaderOptions = {}) {
    this.socket = socket;
    this.highWaterMark = options.highWaterMark ?? 256 * 1024;
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onError);
  }

  /** Bytes received and not yet read. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  /** True once the peer has closed or the connection failed. */
  get closed(): boolean {
    return this.failure !== undefined;
  }

  /** Exactly `n` bytes. Rejects with ConnectionClosed if the stream ends first. */
  async read(n: number): Promise<Buffer> {
    if (this.buffered < n) await this.waitFor(n);
    return this.take(n);
  }

  /** Discard exactly `n` bytes without holding more than one chunk of them. */
  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this.buffered === 0) await this.waitFor(1);
      const k = Math.min(left, this.buffered);
      this.drop(k);
      left -= k;
    }
  }

  /** Make any pending and future read fail with `err` (used to cut a handshake short). */
  fail(err: Error): void {
    if (!this.failure) this.failure = err;
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      w.reject(this.failure);
    }
  }

  /**
   * Stop listening to the socket and hand back the bytes received but not
   * read, in order. The socket is left paused if the reader had paused it;
   * the new owner resumes it.
   */
  detach(): { leftover: Buffer[]; paused: boolean } {
    if (this.attached) {
      this.attached = false;
      this.socket.off('data', this.onData);
      this.socket.off('end', this.onEnd);
      this.socket.off('close', this.onEnd);
      this.socket.off('error', this.onError);
    }
    const leftover = this.chunks;
    this.chunks = [];
    this.buffered = 0;
    return { leftover, paused: this.paused };
  }

  private waitFor(n: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.waiter) return Promise.reject(new Error('SocketReader: only one read at a time'));
    return new Promise<void>((resolve, reject) => {
      this.waiter = { want: n, resolve, reject };
      this.resumeIfDrained(n);
    });
  }

  private wake(): void {
    const w = this.waiter;
    if (w && this.buffered >= w.want) {
      this.waiter = undefined;
      w.resolve();
    }
  }

  private resumeIfDrained(wanted = 0): void {
    // A read larger than the high-water mark must be allowed to fill past it.
    if (this.paused && (this.buffered <= this.highWaterMark || this.buffered < wanted)) {
      this.paused = false;
      this.socket.resume();
    }
  }

  private take(n: number): Buffer {
    const first = this.chunks[0];
    let out: Buffer;
    if (first && first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const c = this.chunks[0];
        if (!c) throw new Error('SocketReader: buffer underrun');
        const k = Math.min(c.length, n - at);
        c.copy(out, at, 0, k);
        at += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    this.resumeIfDrained();
    return out;
  }

  private drop(n: number): void {
    let left = n;
    while (left > 0) {
      const c = this.chunks[0];
      if (!c) throw new Error('SocketReader: buffer underrun');
      if (c.length <= left) {
        this.chunks.shift();
        left -= c.length;
      } else {
        this.chunks[0] = c.subarray(left);
        left = 0;
      }
    }
    this.buffered -= n;
    this.resumeIfDrained();
  }
}
