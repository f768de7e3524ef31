// NBD URIs (NetworkBlockDevice/nbd doc/uri.md), read the way libnbd's
// nbd_connect_uri reads them, so a URI that works with nbdinfo, nbdcopy,
// qemu-img or fio works here too:
//
//   nbd://HOST[:PORT]/EXPORT                 TCP, port 10809 by default
//   nbd+unix:///EXPORT?socket=PATH           a unix socket
//   nbds://... and nbds+unix://...           the same over TLS
//
// The export name is the path without its leading "/", percent-decoded
// ("nbd://h//disk" names "/disk", "nbd://h" and "nbd://h/" name ""). Query
// parameters are percent-decoded name=value pairs separated by "&" (or ";").
// Two parameters are ubcache's own (libnbd ignores parameters it does not
// know, so such a URI still works with nbdinfo or qemu-img):
//
//   outage-timeout=SECONDS   how long a lost server is reconnected to before
//                            the device fails (client.ts; 0: never reconnect)
//   request-timeout=SECONDS  how long a connection with requests in flight
//                            may stay silent before it counts as lost (0: no limit)
//
// The parser is stricter than libnbd where libnbd silently ignores input
// (unknown parameters, a fragment, a host on a unix URI): such a URI would
// not mean what its writer thought, so it is refused with the reason.

/** A URI that cannot be used, with a message that says why. */
export class NbdUriError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdUriError';
  }
}

export type NbdScheme = 'nbd' | 'nbds' | 'nbd+unix' | 'nbds+unix';

export type NbdTransport = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export interface NbdUriTls {
  /** Directory of X.509 certificates (tls-certificates). */
  certificates?: string;
  /** File of PSK usernames and keys (tls-psk-file). */
  pskFile?: string;
  /** The username for PSK (the URI's userinfo, or tls-username). */
  username?: string;
  /** Whether to verify the server's certificate (tls-verify-peer; clients verify by default). */
  verifyPeer?: boolean;
  /** The name to verify the certificate against (tls-hostname). */
  hostname?: string;
  /** anon, x509 or psk (tls-type). */
  type?: 'anon' | 'x509' | 'psk';
}

export interface NbdUri {
  /** The URI as written, for names and messages. */
  readonly text: string;
  readonly scheme: NbdScheme;
  readonly transport: NbdTransport;
  readonly exportName: string;
  /** TLS is required (nbds, nbds+unix). */
  readonly tls: boolean;
  /** TLS settings from the URI (they may appear on any scheme, as libnbd allows; they only matter with TLS). */
  readonly tlsOptions: NbdUriTls;
  /** outage-timeout and request-timeout, in milliseconds, when the URI gives them. */
  readonly timeouts: { outageMs?: number; requestMs?: number };
}

/** The IANA port for NBD. */
export const NBD_DEFAULT_PORT = 10809;

const SCHEMES: Record<string, { tls: boolean; unix: boolean } | undefined> = {
  nbd: { tls: false, unix: false },
  nbds: { tls: true, unix: false },
  'nbd+unix': { tls: false, unix: true },
  'nbds+unix': { tls: true, unix: true },
};

const KNOWN_PARAMETERS = [
  'socket',
  'tls-certificates',
  'tls-psk-file',
  'tls-username',
  'tls-verify-peer',
  'tls-hostname',
  'tls-type',
  'outage-timeout',
  'request-timeout',
];

/** Seconds (a decimal number, or with an "s" or "ms" suffix) as milliseconds. */
function parseSeconds(name: string, value: string): number {
  const m = /^(\d+(?:\.\d+)?)(s|ms)?$/.exec(value);
  if (!m) throw new NbdUriError(`${name}=${value}: expected a number of seconds (e.g. 30, 2.5, 500ms)`);
  const n = Number(m[1]);
  const ms = m[2] === 'ms' ? n : n * 1000;
  if (!Number.isFinite(ms) || ms > 7 * 24 * 3600 * 1000) throw new NbdUriError(`${name}=${value}: too long`);
  return Math.round(ms);
}

/** Does `spec` name an NBD URI (so device specs can be told from paths by their prefix)? */
export function isNbdUri(spec: string): boolean {
  return /^nbds?(\+unix|\+vsock)?:/i.test(spec);
}

/**
 * Percent-decode a URI component into a UTF-8 string. RFC 3986 has no "+"
 * for space (that is HTML forms), and neither does libnbd.
 */
function decode(component: string, what: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < component.length; i++) {
    const c = component.charCodeAt(i);
    if (c === 0x25 /* % */) {
      const hex = component.slice(i + 1, i + 3);
      if (!/^[0-9a-fA-F]{2}$/.test(hex)) {
        throw new NbdUriError(`${what}: '%${hex}' is not a percent-encoded byte (write a literal % as %25)`);
      }
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else if (c <= 0x20 || c === 0x7f) {
      throw new NbdUriError(
        `${what}: the character ${JSON.stringify(component[i])} must be percent-encoded (as %${c.toString(16).padStart(2, '0').toUpperCase()})`,
      );
    } else {
      // Characters outside ASCII (an IRI) are taken as their UTF-8 bytes.
      bytes.push(...Buffer.from(component.slice(i, i + 1 + (c >= 0xd800 && c <= 0xdbff ? 1 : 0)), 'utf8'));
      if (c >= 0xd800 && c <= 0xdbff) i++;
    }
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(Uint8Array.from(bytes));
  } catch {
    throw new NbdUriError(`${what}: the percent-encoded bytes are not valid UTF-8`);
  }
}

function parseVerifyPeer(value: string): boolean {
  switch (value.toLowerCase()) {
    case '1':
    case 'true':
    case 'yes':
    case 'on':
      return true;
    case '0':
    case 'false':
    case 'no':
    case 'off':
      return false;
    default:
      throw new NbdUriError(`tls-verify-peer=${value}: expected 0 or 1 (or false/true)`);
  }
}

function parseQuery(query: string): Map<string, string> {
  const params = new Map<string, string>();
  for (const part of query.split(/[&;]/)) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    const name = decode(eq < 0 ? part : part.slice(0, eq), 'a query parameter name');
    // "name" alone is name="" (as libnbd and CGI read it).
    const value = eq < 0 ? '' : decode(part.slice(eq + 1), `query parameter ${name}`);
    if (name === '') throw new NbdUriError(`query parameter '${part}' has no name`);
    if (!KNOWN_PARAMETERS.includes(name)) {
      throw new NbdUriError(`unknown query parameter '${name}' (known: ${KNOWN_PARAMETERS.join(', ')})`);
    }
    if (params.has(name)) throw new NbdUriError(`query parameter '${name}' is given twice`);
    params.set(name, value);
  }
  return params;
}

/** Split an authority into userinfo, host and port (RFC 3986 section 3.2). */
function parseAuthority(authority: string): { user: string | undefined; host: string; port: number | undefined } {
  const at = authority.lastIndexOf('@');
  const user = at < 0 ? undefined : decode(authority.slice(0, at), 'the user name');
  const hostPort = at < 0 ? authority : authority.slice(at + 1);
  if (user !== undefined && user.includes(':')) {
    throw new NbdUriError('the user name contains ":"; NBD URIs carry no passwords (use tls-psk-file)');
  }
  let host: string;
  let portText: string | undefined;
  if (hostPort.startsWith('[')) {
    const close = hostPort.indexOf(']');
    if (close < 0) throw new NbdUriError(`the IPv6 address in '${hostPort}' has no closing ']'`);
    host = hostPort.slice(1, close);
    if (!/^[0-9A-Fa-f:.]+(%25[\w.~-]+)?$/.test(host)) {
      throw new NbdUriError(`'[${host}]' is not an IPv6 address`);
    }
    host = host.replace('%25', '%');
    const rest = hostPort.slice(close + 1);
    if (rest !== '' && !rest.startsWith(':')) throw new NbdUriError(`unexpected '${rest}' after '[${host}]'`);
    portText = rest === '' ? undefined : rest.slice(1);
  } else {
    const colon = hostPort.lastIndexOf(':');
    host = decode(colon < 0 ? hostPort : hostPort.slice(0, colon), 'the host name');
    portText = colon < 0 ? undefined : hostPort.slice(colon + 1);
    if (host.includes(':')) throw new NbdUriError(`write the IPv6 address ${host} in brackets: [${host}]`);
  }
  let port: number | undefined;
  // An empty port ("host:") means the default, as RFC 3986 says.
  if (portText !== undefined && portText !== '') {
    if (!/^\d+$/.test(portText)) throw new NbdUriError(`port '${portText}' is not a number`);
    port = Number(portText);
    if (port < 1 || port > 65535) throw new NbdUriError(`port ${portText} is not between 1 and 65535`);
  }
  return { user, host, port };
}

/** Parse an NBD URI. Throws NbdUriError saying what is wrong. */
export function parseNbdUri(text: string): NbdUri {
  const fail = (message: string): never => {
    throw new NbdUriError(`NBD URI '${text}': ${message}`);
  };
  try {
    const colon = text.indexOf(':');
    if (colon < 0) {
      return fail(
        'no scheme: an NBD URI starts with nbd://, nbds://, nbd+unix:// or nbds+unix:// ' +
          '(a local socket is nbd+unix:///?socket=PATH)',
      );
    }
    const schemeText = text.slice(0, colon).toLowerCase();
    if (schemeText === 'nbd+vsock' || schemeText === 'nbds+vsock') {
      return fail('AF_VSOCK is not supported; use nbd:// (TCP) or nbd+unix:// (a unix socket)');
    }
    const kind = SCHEMES[schemeText];
    if (!kind) return fail(`unknown scheme '${schemeText}' (expected nbd, nbds, nbd+unix or nbds+unix)`);
    const scheme = schemeText as NbdScheme;
    if (!text.startsWith('//', colon + 1)) return fail(`it must begin with '${scheme}://'`);

    let rest = text.slice(colon + 3);
    const hash = rest.indexOf('#');
    if (hash >= 0) {
      return fail(`a fragment ('${rest.slice(hash)}') means nothing in an NBD URI; write a '#' in a name as %23`);
    }
    const q = rest.indexOf('?');
    const query = q < 0 ? '' : rest.slice(q + 1);
    rest = q < 0 ? rest : rest.slice(0, q);
    const slash = rest.indexOf('/');
    const authority = slash < 0 ? rest : rest.slice(0, slash);
    const path = slash < 0 ? '' : rest.slice(slash);

    const params = parseQuery(query);
    const { user, host, port } = parseAuthority(authority);
    const exportName = decode(path.slice(1), 'the export name');
    if (exportName.includes('\0')) return fail('the export name contains a NUL byte');
    if (Buffer.byteLength(exportName) > 4096) return fail('the export name is longer than 4096 bytes');

    const socket = params.get('socket');
    let transport: NbdTransport;
    if (kind.unix) {
      if (socket === undefined) return fail(`a ${scheme} URI needs the socket: ${scheme}:///EXPORT?socket=PATH`);
      if (socket === '') return fail('socket= is empty; give the path of the unix socket');
      // A leading NUL names a socket in the abstract namespace (uri.md allows it); nowhere else.
      if (socket.indexOf('\0', 1) >= 0) return fail('the socket path contains a NUL byte');
      if (host !== '' || port !== undefined) {
        return fail(`a ${scheme} URI names no host or port (the socket does): write ${scheme}:///EXPORT?socket=PATH`);
      }
      transport = { kind: 'unix', path: socket };
    } else {
      if (socket !== undefined) {
        return fail(`socket= belongs to ${scheme}+unix URIs: write ${scheme}+unix:///EXPORT?socket=PATH`);
      }
      transport = { kind: 'tcp', host: host === '' ? 'localhost' : host, port: port ?? NBD_DEFAULT_PORT };
    }

    const tlsOptions: NbdUriTls = {};
    const certificates = params.get('tls-certificates');
    if (certificates !== undefined) tlsOptions.certificates = certificates;
    const pskFile = params.get('tls-psk-file');
    if (pskFile !== undefined) tlsOptions.pskFile = pskFile;
    const username = params.get('tls-username');
    if (username !== undefined && user !== undefined && username !== user) {
      return fail(`the user name '${user}' and tls-username=${username} disagree`);
    }
    const name = username ?? user;
    if (name !== undefined) tlsOptions.username = name;
    const verify = params.get('tls-verify-peer');
    if (verify !== undefined) tlsOptions.verifyPeer = parseVerifyPeer(verify);
    const hostname = params.get('tls-hostname');
    if (hostname !== undefined) tlsOptions.hostname = hostname;
    const type = params.get('tls-type');
    if (type !== undefined) {
      if (type !== 'anon' && type !== 'x509' && type !== 'psk') {
        return fail(`tls-type=${type}: expected anon, x509 or psk`);
      }
      tlsOptions.type = type;
    }
    const timeouts: { outageMs?: number; requestMs?: number } = {};
    const outage = params.get('outage-timeout');
    if (outage !== undefined) timeouts.outageMs = parseSeconds('outage-timeout', outage);
    const request = params.get('request-timeout');
    if (request !== undefined) timeouts.requestMs = parseSeconds('request-timeout', request);
    return { text, scheme, transport, exportName, tls: kind.tls, tlsOptions, timeouts };
  } catch (err) {
    if (err instanceof NbdUriError && !err.message.startsWith('NBD URI ')) {
      throw new NbdUriError(`NBD URI '${text}': ${err.message}`);
    }
    throw err;
  }
}

/** Where a transport goes, for messages: "unix:/run/x.sock" or "host:10809". */
export function describeTransport(t: NbdTransport): string {
  if (t.kind === 'unix') return `unix:${t.path}`;
  return t.host.includes(':') ? `[${t.host}]:${t.port}` : `${t.host}:${t.port}`;
}
