// serve --http [HOST:]PORT: where the dashboard and /metrics listen. A bare
// port means loopback, so that the figures (device paths, errors) are not
// offered to the network unless someone names an address to do so.

import { CliError } from '../cli/common.ts';

export const DEFAULT_HTTP_HOST = '127.0.0.1';

export function parseHttpAddress(option: string, spec: string): { host: string; port: number } {
  const m = /^(?:(?:\[([^\]]+)\]|([^:[\]]+)):)?(\d+)$/.exec(spec.trim());
  const host = m?.[1] ?? m?.[2] ?? DEFAULT_HTTP_HOST;
  const port = Number(m?.[3]);
  if (!m || !Number.isInteger(port) || port > 65535) {
    throw new CliError(`${option} '${spec}' is not [HOST:]PORT`, {
      hint: `Give a port, e.g. ${option} 9323 (on ${DEFAULT_HTTP_HOST}), or an address and a port, e.g. ${option} [::1]:9323.`,
    });
  }
  return { host, port };
}
