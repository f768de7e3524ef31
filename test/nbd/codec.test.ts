import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  CodecError,
  decodeBlockStatusPayload,
  decodeErrorPayload,
  decodeGreeting,
  decodeInfoReply,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOffsetDataPayload,
  decodeOffsetHolePayload,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeRepMetaContext,
  decodeRepServer,
  decodeRequestHeader,
  decodeSimpleReplyHeader,
  decodeStructuredHeader,
  encodeBlockStatusChunk,
  encodeClientFlags,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeInfoString,
  encodeMetaContextRequest,
  encodeNoneChunk,
  encodeOptionError,
  encodeOptionReply,
  encodeOptionRequest,
  encodeRepMetaContext,
  encodeRepServer,
  encodeRequestHeader,
  encodeSimpleReply,
  truncateUtf8,
  writeOffsetDataPrefix,
  OFFSET_DATA_PREFIX,
} from '../../src/nbd/codec.ts';
import {
  IHAVEOPT,
  Info,
  NBD_MAGIC,
  OPTION_REPLY_MAGIC,
  REQUEST_MAGIC,
  Rep,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from '../../src/nbd/protocol.ts';

const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
const safeOffset = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });
const name = fc.string({ unit: 'grapheme', maxLength: 40 });

test('the greeting is NBDMAGIC, IHAVEOPT and the handshake flags, byte for byte', () => {
  const g = encodeGreeting(3);
  assert.equal(g.toString('latin1', 0, 16), 'NBDMAGICIHAVEOPT');
  assert.deepEqual([...g.subarray(16)], [0, 3]);
  assert.deepEqual(decodeGreeting(g), { magic: NBD_MAGIC, optMagic: IHAVEOPT, handshakeFlags: 3 });
  assert.deepEqual([...encodeClientFlags(0x80000001)], [0x80, 0, 0, 1]);
});

test('option requests and replies round-trip and have the documented layout', () => {
  fc.assert(
    fc.property(u32, fc.uint8Array({ maxLength: 64 }), (option, bytes) => {
      const data = Buffer.from(bytes);
      const req = encodeOptionRequest(option, data);
      assert.equal(req.toString('latin1', 0, 8), 'IHAVEOPT');
      assert.deepEqual(decodeOptionHeader(req), { magic: IHAVEOPT, option, length: data.length });
      assert.deepEqual(req.subarray(16), data);
      const rep = encodeOptionReply(option, Rep.ERR_UNSUP, data);
      assert.deepEqual(decodeOptionReplyHeader(rep), {
        magic: OPTION_REPLY_MAGIC,
        option,
        type: Rep.ERR_UNSUP,
        length: data.length,
      });
      assert.deepEqual(rep.subarray(20), data);
    }),
  );
  // A declared length may differ from the data actually sent (hostile tests rely on it).
  assert.equal(decodeOptionHeader(encodeOptionRequest(7, Buffer.alloc(2), 1000)).length, 1000);
  assert.equal(rep0x(encodeOptionReply(1, Rep.ACK)), '0003e889045565a9000000010000000100000000');
});

function rep0x(b: Buffer): string {
  return b.toString('hex');
}

test('INFO/GO data round-trips, and malformed data is rejected with a reason', () => {
  fc.assert(
    fc.property(name, fc.array(u16, { maxLength: 8 }), (n, requests) => {
      assert.deepEqual(decodeInfoRequest(encodeInfoRequest({ name: n, requests })), { name: n, requests });
    }),
  );
  assert.throws(() => decodeInfoRequest(Buffer.alloc(5)), CodecError);
  const good = encodeInfoRequest({ name: 'disk', requests: [Info.NAME] });
  const longName = Buffer.from(good);
  longName.writeUInt32BE(100, 0);
  assert.throws(() => decodeInfoRequest(longName), /does not fit/);
  assert.throws(() => decodeInfoRequest(good.subarray(0, good.length - 1)), /information requests need 2 bytes/);
  assert.throws(() => decodeInfoRequest(Buffer.concat([good, Buffer.alloc(2)])), /need 2 bytes but 4/);
  const huge = encodeInfoRequest({ name: 'x'.repeat(5000), requests: [] });
  assert.throws(() => decodeInfoRequest(huge), /limit is 4096/);
});

test('meta context requests round-trip, and malformed ones are rejected with a reason', () => {
  fc.assert(
    fc.property(name, fc.array(name, { maxLength: 6 }), (exportName, queries) => {
      assert.deepEqual(decodeMetaContextRequest(encodeMetaContextRequest({ exportName, queries })), {
        exportName,
        queries,
      });
    }),
  );
  const good = encodeMetaContextRequest({ exportName: 'd', queries: ['base:allocation'] });
  assert.throws(() => decodeMetaContextRequest(good.subarray(0, 7)), CodecError);
  assert.throws(() => decodeMetaContextRequest(good.subarray(0, good.length - 1)), /runs past the end/);
  assert.throws(() => decodeMetaContextRequest(Buffer.concat([good, Buffer.from([1])])), /stray bytes/);
  const lying = Buffer.from(good);
  lying.writeUInt32BE(0xffffffff, 5); // query count
  assert.throws(() => decodeMetaContextRequest(lying), /cannot fit/);
  const noQueryLength = encodeMetaContextRequest({ exportName: 'd', queries: [] });
  noQueryLength.writeUInt32BE(1, 5);
  assert.throws(() => decodeMetaContextRequest(Buffer.concat([noQueryLength, Buffer.alloc(2)])), CodecError);
});

test('info replies encode to the spec lengths and decode back', () => {
  fc.assert(
    fc.property(safeOffset, u16, (size, flags) => {
      const b = encodeInfoExport(size, flags);
      assert.equal(b.length, 12);
      assert.deepEqual(decodeInfoReply(b), { type: Info.EXPORT, size, flags });
    }),
  );
  assert.deepEqual(decodeInfoReply(encodeInfoString(Info.NAME, 'dïsk')), { type: Info.NAME, name: 'dïsk' });
  assert.deepEqual(decodeInfoReply(encodeInfoString(Info.DESCRIPTION, 'd')), {
    type: Info.DESCRIPTION,
    description: 'd',
  });
  const bs = encodeInfoBlockSize({ min: 1, preferred: 4096, max: 1 << 25 });
  assert.equal(bs.toString('hex'), '0003' + '00000001' + '00001000' + '02000000');
  assert.deepEqual(decodeInfoReply(bs), { type: Info.BLOCK_SIZE, sizes: { min: 1, preferred: 4096, max: 1 << 25 } });
  assert.deepEqual(decodeInfoReply(Buffer.from([0, 9, 1])), { type: 9, raw: Buffer.from([1]) });
  assert.throws(() => decodeInfoReply(Buffer.from([0])), CodecError);
  assert.throws(() => decodeInfoReply(encodeInfoExport(1, 1).subarray(0, 11)), CodecError);
  assert.throws(() => decodeInfoReply(bs.subarray(0, 13)), CodecError);
});

test('LIST and META_CONTEXT replies round-trip', () => {
  fc.assert(
    fc.property(name, name, u32, (n, d, id) => {
      assert.deepEqual(decodeRepServer(encodeRepServer(n, d)), { name: n, description: d });
      assert.deepEqual(decodeRepMetaContext(encodeRepMetaContext(id, n)), { id, name: n });
    }),
  );
  assert.throws(() => decodeRepServer(Buffer.from([0, 0, 0, 9, 65])), CodecError);
  assert.throws(() => decodeRepServer(Buffer.alloc(3)), CodecError);
  assert.throws(() => decodeRepMetaContext(Buffer.alloc(3)), CodecError);
});

test('the EXPORT_NAME reply is 134 bytes, or 10 with NO_ZEROES', () => {
  const full = encodeExportNameReply(1 << 20, 0x1234, false);
  assert.equal(full.length, 134);
  assert.ok(full.subarray(10).every((b) => b === 0));
  const short = encodeExportNameReply(1 << 20, 0x1234, true);
  assert.equal(short.toString('hex'), '0000000000100000' + '1234');
});

test('option error replies carry the message, cut to 4096 bytes at a character boundary', () => {
  const r = encodeOptionError(7, Rep.ERR_UNKNOWN, 'no such export');
  assert.equal(decodeOptionReplyHeader(r).type, Rep.ERR_UNKNOWN);
  assert.equal(r.toString('utf8', 20), 'no such export');
  const long = encodeOptionError(7, Rep.ERR_INVALID, 'é'.repeat(3000));
  assert.equal(decodeOptionReplyHeader(long).length, 4096);
});

test('request headers round-trip with 64-bit cookies and offsets', () => {
  fc.assert(
    fc.property(u16, u16, u64, safeOffset, u32, (flags, type, cookie, offset, length) => {
      const b = encodeRequestHeader({ flags, type, cookie, offset, length });
      assert.equal(b.length, 28);
      assert.deepEqual(decodeRequestHeader(b), { magic: REQUEST_MAGIC, flags, type, cookie, offset, length });
      // Decoding in place, at an offset inside a larger buffer, gives the same answer.
      assert.deepEqual(decodeRequestHeader(Buffer.concat([Buffer.alloc(5), b]), 5), decodeRequestHeader(b));
    }),
  );
  const huge = decodeRequestHeader(encodeRequestHeader({ type: 0, cookie: 1n, offset: 2n ** 64n - 1n, length: 1 }));
  assert.ok(huge.offset >= 2 ** 64 - 4096, 'an offset beyond 2^53 still compares as huge');
  assert.equal(
    encodeRequestHeader({ type: 1, flags: 1, cookie: 0x0102030405060708n, offset: 512, length: 4096 }).toString('hex'),
    '25609513' + '0001' + '0001' + '0102030405060708' + '0000000000000200' + '00001000',
  );
});

test('simple and structured reply headers round-trip', () => {
  fc.assert(
    fc.property(u32, u64, (error, cookie) => {
      assert.deepEqual(decodeSimpleReplyHeader(encodeSimpleReply(error, cookie)), {
        magic: SIMPLE_REPLY_MAGIC,
        error,
        cookie,
      });
    }),
  );
  assert.deepEqual(decodeStructuredHeader(encodeNoneChunk(9n)), {
    magic: STRUCTURED_REPLY_MAGIC,
    flags: ReplyFlag.DONE,
    type: ReplyType.NONE,
    cookie: 9n,
    length: 0,
  });
});

test('OFFSET_DATA chunks frame the data that follows the prefix', () => {
  fc.assert(
    fc.property(safeOffset, fc.uint8Array({ minLength: 1, maxLength: 100 }), u64, (offset, bytes, cookie) => {
      const buf = Buffer.alloc(OFFSET_DATA_PREFIX + bytes.length);
      Buffer.from(bytes).copy(buf, OFFSET_DATA_PREFIX);
      writeOffsetDataPrefix(buf, cookie, offset, bytes.length);
      const h = decodeStructuredHeader(buf);
      assert.deepEqual(h, {
        magic: STRUCTURED_REPLY_MAGIC,
        flags: ReplyFlag.DONE,
        type: ReplyType.OFFSET_DATA,
        cookie,
        length: 8 + bytes.length,
      });
      const p = decodeOffsetDataPayload(buf.subarray(20));
      assert.equal(p.offset, offset);
      assert.deepEqual(p.data, Buffer.from(bytes));
    }),
  );
  assert.throws(() => decodeOffsetDataPayload(Buffer.alloc(8)), CodecError);
  const hole = Buffer.alloc(12);
  hole.writeUInt32BE(77, 8);
  assert.deepEqual(decodeOffsetHolePayload(hole), { offset: 0, length: 77 });
  assert.throws(() => decodeOffsetHolePayload(Buffer.alloc(11)), CodecError);
});

test('error chunks round-trip their error and message', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 0xffffffff }),
      fc.string({ maxLength: 200 }),
      u64,
      (error, message, cookie) => {
        const b = encodeErrorChunk(cookie, error, message);
        const h = decodeStructuredHeader(b);
        assert.equal(h.type, ReplyType.ERROR);
        assert.equal(h.flags, ReplyFlag.DONE);
        assert.equal(h.length, b.length - 20);
        assert.deepEqual(decodeErrorPayload(b.subarray(20)), {
          error,
          message: truncateUtf8(message, 4096).toString(),
        });
      },
    ),
  );
  const withOffset = Buffer.concat([Buffer.from([0, 0, 0, 5, 0, 1, 0x41]), Buffer.from('0000000000000200', 'hex')]);
  assert.deepEqual(decodeErrorPayload(withOffset), { error: 5, message: 'A', offset: 512 });
  assert.throws(() => decodeErrorPayload(Buffer.alloc(5)), CodecError);
  assert.throws(() => decodeErrorPayload(Buffer.from([0, 0, 0, 5, 0, 9])), CodecError);
});

test('block status chunks round-trip their descriptors', () => {
  const desc = fc.record({ length: fc.integer({ min: 1, max: 0xffffffff }), flags: u32 }).map((d) => ({ ...d }));
  fc.assert(
    fc.property(u32, fc.array(desc, { minLength: 1, maxLength: 20 }), (id, extents) => {
      const b = encodeBlockStatusChunk(5n, id, extents);
      assert.equal(decodeStructuredHeader(b).length, 4 + 8 * extents.length);
      assert.deepEqual(decodeBlockStatusPayload(b.subarray(20)), { contextId: id, extents });
    }),
  );
  assert.throws(() => decodeBlockStatusPayload(Buffer.alloc(4)), CodecError);
  assert.throws(() => decodeBlockStatusPayload(Buffer.alloc(13)), CodecError);
});

test('truncateUtf8 never splits a character and never exceeds the limit', () => {
  fc.assert(
    fc.property(fc.string({ unit: 'grapheme', maxLength: 60 }), fc.integer({ min: 0, max: 80 }), (s, limit) => {
      const out = truncateUtf8(s, limit);
      assert.ok(out.length <= limit);
      const text = out.toString('utf8');
      assert.ok(!text.includes('\ufffd') || s.includes('\ufffd'), 'no broken character');
      assert.ok(s.startsWith(text));
    }),
  );
});
