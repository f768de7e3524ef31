// A small client of the control socket (HTTP over a unix socket), for
// `ubcache ctl` and the tests.

import { request } from 'node:http';

export interface ControlResponse {
  status: number;
  body: string;
}

export function controlRequest(
  socketPath: string,
  method: string,
  path: string,
  body?: string,
): Promise<ControlResponse> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath,
        method,
        path,
        headers: body === undefined ? {} : { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    // The socket may fail (EPIPE) after the reply came, when the server
    // answered and closed before the request was all written; by then the
    // request has let go of its socket, and an error with no listener would
    // end the process. The reply decides; a late socket error changes nothing.
    req.on('socket', (socket) => socket.on('error', reject));
    req.end(body);
  });
}

/** The message of an error reply ({"error","message"}), or the body as it is. */
export function errorText(r: ControlResponse): string {
  try {
    const e = JSON.parse(r.body) as { error?: unknown; message?: unknown };
    if (typeof e.message === 'string') return `${e.message} (${String(e.error)})`;
  } catch {
    // Not JSON: say what came.
  }
  return `HTTP ${r.status}: ${r.body.trim()}`;
}
