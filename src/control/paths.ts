// Where the control socket lives when --control is not given; serve and ctl
// agree on it.

import { join } from 'node:path';

export function defaultControlPath(env: NodeJS.ProcessEnv = process.env): string {
  const runtime = env['XDG_RUNTIME_DIR'];
  return runtime !== undefined && runtime !== ''
    ? join(runtime, 'ubcache', 'control.sock')
    : '/run/ubcache/control.sock';
}
