// systemd's readiness and status protocol (sd_notify(3)) for `serve` under a
// Type=notify unit: READY=1 once serving, STATUS=... now and then, STOPPING=1
// at shutdown. Each message is one datagram on the AF_UNIX socket named by
// $NOTIFY_SOCKET. Node has no unix datagram sockets, so the datagram is sent
// by the native addon (native/daemon.c, a plain sendto): the alternative,
// running systemd-notify(1) for each message, sends from another pid, which
// systemd ignores under NotifyAccess=main and may fail to attribute to the
// unit once that short-lived process is gone (the race its own man page
// warns of). Without the addon, notification is off and serve says so: a
// Type=notify unit would then time out, so the shipped unit says to build it.
//
// The variable is removed from the environment once read (sd_notify's
// unset_environment), so a --run command or anything else serve starts does
// not talk to systemd in serve's name.

import { loadNative } from '../blockdev/native.ts';
import { errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';

export interface Notifier {
  /** Send one message (`READY=1`, `STATUS=...`, several as lines). Failures are logged, never thrown. */
  send(message: string): void;
}

/** Turn a free text into one STATUS= value: a single line, within a datagram's comfortable size. */
export function statusMessage(text: string): string {
  const line = text.replace(/[\r\n]+/g, ' ').slice(0, 1000);
  return `STATUS=${line}`;
}

/**
 * The notifier $NOTIFY_SOCKET asks for, or undefined when it is unset (not
 * under systemd, or not Type=notify). `send` is injectable for tests.
 */
export function notifierFromEnv(
  env: NodeJS.ProcessEnv = process.env,
  send?: (address: string, message: string) => void,
): Notifier | undefined {
  const address = env['NOTIFY_SOCKET'];
  Reflect.deleteProperty(env, 'NOTIFY_SOCKET');
  if (address === undefined || address === '') return undefined;
  if (!address.startsWith('/') && !address.startsWith('@')) {
    log.warn(`NOTIFY_SOCKET=${address}: only unix socket paths and abstract names (@...) are supported; not notifying`);
    return undefined;
  }
  const sender = send ?? loadNative()?.notifySend ?? null;
  if (sender === null) {
    log.warn(
      `NOTIFY_SOCKET is set but the native addon (needed to send to it) is not built: systemd will not hear ` +
        'READY=1; rebuild with a C compiler (npm run build) or use Type=simple',
    );
    return undefined;
  }
  let failed = false;
  return {
    send(message) {
      try {
        sender(address, message);
        failed = false;
      } catch (err) {
        // Once per run of failures: a supervisor gone away should not flood the log.
        if (!failed) log.warn(`cannot notify systemd on ${address}: ${errorMessage(err)}`);
        failed = true;
      }
    },
  };
}
