// The control socket as `ubcache ctl` uses it: attribute reads and writes
// and the JSON tree, with an unreachable daemon and the daemon's refusals
// turned into errors that say what to do.

import { controlRequest, errorText, type ControlResponse } from '../../control/client.ts';
import { errorMessage } from '../../util/lifecycle.ts';
import { CliError } from '../common.ts';
import type { Json } from './tree-json.ts';

/** The daemon could not be reached: not running, or gone (--watch and wait-clean end on it). */
export class DaemonUnreachable extends CliError {}

/** "block/bcache0" -> "/sys/block/bcache0". */
export function sysPath(path: string): string {
  const parts = path.split('/').filter((p) => p !== '');
  if (parts[0] === 'sys') parts.shift();
  return `/sys/${parts.map(encodeURIComponent).join('/')}`.replace(/\/$/, '') || '/sys';
}

export class Control {
  readonly socket: string;

  constructor(socket: string) {
    this.socket = socket;
  }

  async request(method: string, path: string, body?: string): Promise<ControlResponse> {
    let r: ControlResponse;
    try {
      r = await controlRequest(this.socket, method, path, body);
    } catch (err) {
      throw new DaemonUnreachable(`cannot reach the control socket ${this.socket}: ${errorMessage(err)}`, {
        hint: 'Is ubcache serve running? Pass its --control PATH if it was started with one.',
      });
    }
    if (r.status >= 400) throw new CliError(errorText(r));
    return r;
  }

  /** cat PATH */
  async read(path: string): Promise<string> {
    return (await this.request('GET', sysPath(path))).body;
  }

  /** echo VALUE > PATH; a refusal is prefixed with `what` (the action, for the verbs). */
  async write(path: string, value: string, what?: string): Promise<void> {
    try {
      await this.request('PUT', sysPath(path), value);
    } catch (err) {
      if (what === undefined || err instanceof DaemonUnreachable || !(err instanceof CliError)) throw err;
      throw new CliError(`${what}: ${err.message}`, err.hint === undefined ? {} : { hint: err.hint });
    }
  }

  /** The tree below PATH as JSON. */
  async json(path = '/sys'): Promise<Json> {
    return JSON.parse((await this.request('GET', `/json${sysPath(path)}`)).body) as Json;
  }
}
