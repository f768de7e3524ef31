// An asynchronous reader/writer lock with a synchronous fast path.
//
// tryRead()/tryWrite() take the lock without a promise when it is free, so
// the common uncontended case (a lookup or insert whose nodes are all in
// memory) runs start to end without yielding. read()/write() queue in FIFO
// order; consecutive readers at the head of the queue are admitted together.
// A queued writer blocks later readers, so writers are not starved.

import { defined } from './assert.ts';

interface Waiter {
  exclusive: boolean;
  resolve: () => void;
}

export class RwLock {
  private readers = 0;
  private writer = false;
  private readonly queue: Waiter[] = [];

  get readersHeld(): number {
    return this.readers;
  }

  get writeHeld(): boolean {
    return this.writer;
  }

  get idle(): boolean {
    return this.readers === 0 && !this.writer && this.queue.length === 0;
  }

  tryRead(): boolean {
    if (this.writer || this.queue.length > 0) return false;
    this.readers++;
    return true;
  }

  tryWrite(): boolean {
    if (this.writer || this.readers > 0 || this.queue.length > 0) return false;
    this.writer = true;
    return true;
  }

  read(): Promise<void> {
    if (this.tryRead()) return Promise.resolve();
    return new Promise<void>((resolve) => this.queue.push({ exclusive: false, resolve }));
  }

  write(): Promise<void> {
    if (this.tryWrite()) return Promise.resolve();
    return new Promise<void>((resolve) => this.queue.push({ exclusive: true, resolve }));
  }

  releaseRead(): void {
    if (this.readers <= 0) throw new Error('RwLock: releaseRead() without a read lock');
    this.readers--;
    this.dispatch();
  }

  releaseWrite(): void {
    if (!this.writer) throw new Error('RwLock: releaseWrite() without the write lock');
    this.writer = false;
    this.dispatch();
  }

  private dispatch(): void {
    while (this.queue.length > 0 && !this.writer) {
      const head = defined(this.queue[0], 'queue.length > 0');
      if (head.exclusive) {
        if (this.readers > 0) return;
        this.queue.shift();
        this.writer = true;
        head.resolve();
        return;
      }
      this.queue.shift();
      this.readers++;
      head.resolve();
    }
  }
}
