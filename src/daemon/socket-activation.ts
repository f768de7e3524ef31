// Socket activation (sd_listen_fds(3)): systemd, or systemd-socket-activate,
// opens the NBD listening sockets and starts serve with them as file
// descriptors 3, 4, ... and LISTEN_FDS=<count>, LISTEN_PID=<our pid>. serve
// then accepts on those instead of listening itself, as nbdkit does (and,
// as nbdkit, refuses its own listener options alongside: the unit's .socket
// file says where to listen). The variables are removed once read so that
// nothing serve starts takes the sockets for its own.

/** The first passed descriptor (SD_LISTEN_FDS_START). */
export const LISTEN_FDS_START = 3;

export class SocketActivationError extends Error {}

/**
 * The listening descriptors passed to this process, or [] when none were
 * (no LISTEN_FDS, or LISTEN_PID names another process: the variables were
 * inherited, not meant for us). Throws on malformed values.
 */
export function listenFdsFromEnv(env: NodeJS.ProcessEnv = process.env, pid = process.pid): number[] {
  const fdsText = env['LISTEN_FDS'];
  const pidText = env['LISTEN_PID'];
  for (const name of ['LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES']) Reflect.deleteProperty(env, name);
  if (fdsText === undefined || pidText === undefined) return [];
  if (!/^\d+$/.test(pidText)) throw new SocketActivationError(`LISTEN_PID=${pidText} is not a process id`);
  if (Number(pidText) !== pid) return [];
  if (!/^\d+$/.test(fdsText)) throw new SocketActivationError(`LISTEN_FDS=${fdsText} is not a count`);
  const n = Number(fdsText);
  if (n === 0) throw new SocketActivationError('LISTEN_FDS=0: socket activation passed no socket');
  // A sanity bound: a unit has a handful of ListenStream= lines, not thousands.
  if (n > 64) throw new SocketActivationError(`LISTEN_FDS=${n}: more sockets than serve takes (64)`);
  return Array.from({ length: n }, (_, i) => LISTEN_FDS_START + i);
}
