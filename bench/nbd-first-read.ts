// A tiny NBD client for one question: when does a server first answer a read?
// It connects to a unix socket, negotiates fixed newstyle with NBD_OPT_GO,
// reads 4 KiB at offset 0 and says whether that worked. Polling it every few
// milliseconds from the moment a server is spawned gives "start to first byte
// served" without the noise of starting a client process per attempt.

import { connect, type Socket } from 'node:net';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const REPLY_MAGIC = 0x3e889045565a9n;
const NBD_OPT_GO = 7;
const NBD_REP_ACK = 1;
const NBD_FLAG_C_FIXED_NEWSTYLE = 1;
const NBD_FLAG_C_NO_ZEROES = 2;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const NBD_CMD_READ = 0;
const NBD_CMD_DISC = 2;

/** Bytes arriving on a socket, read in exact amounts. */
class Reader {
  private buf = Buffer.alloc(0);
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private failed: Error | undefined;

  constructor(sock: Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.pump();
    });
    const fail = (e: Error): void => {
      this.failed ??= e;
      const w = this.want;
      this.want = undefined;
      w?.reject(this.failed);
    };
    sock.on('error', fail);
    sock.on('close', () => {
      fail(new Error('connection closed'));
    });
  }

  private pump(): void {
    const w = this.want;
    if (w && this.buf.length >= w.n) {
      this.want = undefined;
      const out = this.buf.subarray(0, w.n);
      this.buf = this.buf.subarray(w.n);
      w.resolve(out);
    }
  }

  read(n: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      if (this.failed && this.buf.length < n) {
        reject(this.failed);
        return;
      }
      this.want = { n, resolve, reject };
      this.pump();
    });
  }
}

/** Read 4 KiB at offset 0 of `exportName`; resolves true on success, false on any failure. */
export async function tryFirstRead(socketPath: string, exportName: string, timeoutMs = 10_000): Promise<boolean> {
  const sock = connect(socketPath);
  const timer = setTimeout(() => sock.destroy(new Error('timeout')), timeoutMs);
  try {
    const r = new Reader(sock);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    const hello = await r.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) return false;
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    const name = Buffer.from(exportName);
    const opt = Buffer.alloc(16 + 4 + name.length + 2);
    opt.writeBigUInt64BE(IHAVEOPT, 0);
    opt.writeUInt32BE(NBD_OPT_GO, 8);
    opt.writeUInt32BE(4 + name.length + 2, 12);
    opt.writeUInt32BE(name.length, 16);
    name.copy(opt, 20);
    opt.writeUInt16BE(0, 20 + name.length);
    sock.write(Buffer.concat([flags, opt]));
    // NBD_REP_INFO replies until NBD_REP_ACK; an error reply has the high bit set.
    for (;;) {
      const head = await r.read(20);
      if (head.readBigUInt64BE(0) !== REPLY_MAGIC) return false;
      const type = head.readUInt32BE(12);
      const len = head.readUInt32BE(16);
      if (len > 0) await r.read(len);
      if (type === NBD_REP_ACK) break;
      if (type >= 0x80000000) return false;
    }
    const req = Buffer.alloc(28);
    req.writeUInt32BE(REQUEST_MAGIC, 0);
    req.writeUInt16BE(0, 4);
    req.writeUInt16BE(NBD_CMD_READ, 6);
    req.writeBigUInt64BE(1n, 8);
    req.writeBigUInt64BE(0n, 16);
    req.writeUInt32BE(4096, 24);
    sock.write(req);
    const reply = await r.read(16);
    if (reply.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC || reply.readUInt32BE(4) !== 0) return false;
    await r.read(4096);
    const disc = Buffer.alloc(28);
    disc.writeUInt32BE(REQUEST_MAGIC, 0);
    disc.writeUInt16BE(NBD_CMD_DISC, 6);
    sock.end(disc);
    return true;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
    sock.destroy();
  }
}

/**
 * Poll until a 4 KiB read of `exportName` succeeds: milliseconds from `t0`
 * (performance.now() taken just before the server was spawned).
 */
export async function firstByteMs(
  socketPath: string,
  exportName: string,
  t0: number,
  opts: { deadlineMs: number; alive: () => boolean },
): Promise<number> {
  for (;;) {
    if (await tryFirstRead(socketPath, exportName)) return performance.now() - t0;
    if (!opts.alive()) throw new Error('the server exited before serving a read');
    if (performance.now() - t0 > opts.deadlineMs) throw new Error(`no read served within ${opts.deadlineMs} ms`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
