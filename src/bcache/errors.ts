// The error of a refused runtime operation (register, attach, run): the
// kernel's message and the errno its sysfs store returns, set where the
// refusal is decided. Callers map it by its code (sysfs/ passes it on as a
// SysfsError, the control socket as its status); nothing looks at the
// message to find the errno.

import { constants } from 'node:os';

/** The errnos a refused operation returns (the kernel's sysfs stores return these negated). */
export type OperationErrno = 'EINVAL' | 'EBUSY' | 'ENOENT' | 'EIO';

export class OperationError extends Error {
  /** The errno's name, as Node's system errors have it. */
  readonly code: OperationErrno;
  constructor(code: OperationErrno, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'OperationError';
    this.code = code;
  }

  /** The errno's number on this system (positive, as in errno.h). */
  get errno(): number {
    return constants.errno[this.code];
  }
}
