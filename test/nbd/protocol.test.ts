import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  commandName,
  isErrorChunk,
  isErrorReply,
  NbdErr,
  nbdErrorFromErrno,
  nbdErrorName,
  optionName,
  Rep,
  replyTypeName,
  ReplyType,
} from '../../src/nbd/protocol.ts';

test('host errors map onto the NBD error values the spec allows', () => {
  assert.equal(nbdErrorFromErrno('EDQUOT'), NbdErr.ENOSPC);
  assert.equal(nbdErrorFromErrno('EFBIG'), NbdErr.ENOSPC);
  assert.equal(nbdErrorFromErrno('ENOSPC'), NbdErr.ENOSPC);
  assert.equal(nbdErrorFromErrno('EROFS'), NbdErr.EPERM);
  assert.equal(nbdErrorFromErrno('EPERM'), NbdErr.EPERM);
  assert.equal(nbdErrorFromErrno('EACCES'), NbdErr.EPERM);
  assert.equal(nbdErrorFromErrno('EINVAL'), NbdErr.EINVAL);
  assert.equal(nbdErrorFromErrno('EOPNOTSUPP'), NbdErr.ENOTSUP);
  assert.equal(nbdErrorFromErrno('ESHUTDOWN'), NbdErr.ESHUTDOWN);
  assert.equal(nbdErrorFromErrno('EIO'), NbdErr.EIO);
  assert.equal(nbdErrorFromErrno('EBADF'), NbdErr.EIO, 'anything unknown is EIO');
  assert.equal(nbdErrorFromErrno('ERR_SOMETHING_NODE'), NbdErr.EIO);
});

test('the spec numbers of errors, replies and chunk types', () => {
  assert.deepEqual(
    [NbdErr.EPERM, NbdErr.EIO, NbdErr.ENOMEM, NbdErr.EINVAL, NbdErr.ENOSPC, NbdErr.EOVERFLOW, NbdErr.ENOTSUP],
    [1, 5, 12, 22, 28, 75, 95],
  );
  assert.equal(NbdErr.ESHUTDOWN, 108);
  assert.equal(Rep.ERR_UNSUP, 2 ** 31 + 1);
  assert.equal(Rep.ERR_TOO_BIG, 2 ** 31 + 9);
  assert.ok(isErrorReply(Rep.ERR_SHUTDOWN) && !isErrorReply(Rep.ACK));
  assert.equal(ReplyType.ERROR, 32769);
  assert.ok(isErrorChunk(ReplyType.ERROR_OFFSET) && !isErrorChunk(ReplyType.BLOCK_STATUS));
});

test('names for logs', () => {
  assert.equal(nbdErrorName(22), 'EINVAL');
  assert.equal(nbdErrorName(99), 'error 99');
  assert.equal(commandName(1), 'WRITE');
  assert.equal(commandName(42), 'command 42');
  assert.equal(optionName(7), 'NBD_OPT_GO');
  assert.equal(optionName(1234), 'option 1234');
  assert.equal(replyTypeName(Rep.ERR_UNKNOWN), 'NBD_REP_ERR_UNKNOWN');
  assert.equal(replyTypeName(5), 'reply 5');
});
