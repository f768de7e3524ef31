// TLS for the NBD client (nbds://, nbds+unix://): what the URI's tls-*
// parameters mean, read the way libnbd reads them, and the upgrade of a
// socket after NBD_OPT_STARTTLS (proto.md "TLS support": STARTTLS comes
// before any other option; once it is acknowledged the TLS handshake runs on
// the same socket and the option haggling continues inside TLS).
//
//   tls-psk-file=FILE      PSK: lines "username:hexkey" as psktool writes them;
//                          the key is the line of tls-username (or the URI's
//                          user name), else of the local user name, as libnbd
//   tls-certificates=DIR   X.509: DIR/ca-cert.pem, and DIR/client-cert.pem with
//                          DIR/client-key.pem if both are there; without it,
//                          libnbd's default directories (root: /etc/pki/libnbd,
//                          else ~/.pki/libnbd, ~/.config/pki/libnbd), else the
//                          system's trusted CAs
//   tls-verify-peer=false  do not verify the server's certificate
//   tls-hostname=NAME      the name the certificate must carry (default: the
//                          TCP host; a unix socket checks the chain only, its
//                          path being the server's identity)
//
// PSK: Node's default cipher list has no PSK suites. TLS 1.3 with a PSK works
// with the SHA-256 suites (Node hashes an external PSK with SHA-256; nbdkit's
// GnuTLS refuses a SHA-384 suite for it), and TLS 1.2 servers need the PSK
// suites named, so both are listed (checked against nbdkit 1.32/GnuTLS 3.7).

import { existsSync, readFileSync } from 'node:fs';
import { homedir, userInfo } from 'node:os';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { checkServerIdentity, connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import type { Socket } from 'node:net';
import type { NbdUri } from './uri.ts';

/** What a client needs to upgrade a connection, resolved once per client (files read at connect). */
export interface TlsConfig {
  kind: 'psk' | 'x509';
  /** For messages: "PSK user alice", "X.509 (CA /etc/pki/libnbd/ca-cert.pem)". */
  describe: string;
  options: ConnectionOptions;
}

/** A setting that cannot work (a missing file, no key for the user); never retried. */
export class TlsConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TlsConfigError';
  }
}

export const PSK_CIPHERS = [
  'TLS_AES_128_GCM_SHA256',
  'TLS_CHACHA20_POLY1305_SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
].join(':');

export function readOrFail(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    const code = err !== null && typeof err === 'object' && 'code' in err ? String(err.code) : 'error';
    throw new TlsConfigError(`cannot read ${what} ${path} (${code})`);
  }
}

/** Parse a psktool keys file into username -> key. */
export function parsePskFile(text: string, file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const colon = line.lastIndexOf(':');
    const user = colon < 0 ? '' : line.slice(0, colon);
    const hex = colon < 0 ? '' : line.slice(colon + 1);
    if (user === '' || !/^([0-9a-fA-F]{2})+$/.test(hex)) {
      throw new TlsConfigError(`${file} line ${i + 1}: expected username:hexkey (as psktool writes)`);
    }
    if (!keys.has(user)) keys.set(user, Buffer.from(hex, 'hex'));
  }
  return keys;
}

function localUser(): string {
  try {
    return userInfo().username;
  } catch {
    return process.env['USER'] ?? process.env['LOGNAME'] ?? '';
  }
}

/** libnbd's default certificate directory, if one exists. */
function defaultCertificateDir(): string | undefined {
  const candidates =
    process.getuid?.() === 0
      ? ['/etc/pki/libnbd']
      : [join(homedir(), '.pki', 'libnbd'), join(homedir(), '.config', 'pki', 'libnbd')];
  return candidates.find((d) => existsSync(d));
}

/** Resolve the URI's TLS settings into connection options (reading the key and certificate files now). */
export function resolveTls(uri: NbdUri): TlsConfig {
  const t = uri.tlsOptions;
  if (t.type === 'anon') {
    throw new TlsConfigError('tls-type=anon (anonymous TLS) is not supported: use X.509 certificates or a PSK');
  }
  const psk = t.type === 'psk' || (t.type === undefined && t.pskFile !== undefined);
  if (psk) {
    if (t.pskFile === undefined) throw new TlsConfigError('tls-type=psk needs tls-psk-file=FILE');
    const keys = parsePskFile(readOrFail(t.pskFile, 'the PSK file').toString('utf8'), t.pskFile);
    const identity = t.username ?? localUser();
    const key = keys.get(identity);
    if (!key) {
      throw new TlsConfigError(
        `${t.pskFile} has no key for user '${identity}'` +
          (t.username === undefined ? ' (the local user name; choose another with tls-username=NAME)' : ''),
      );
    }
    return {
      kind: 'psk',
      describe: `PSK user ${identity}`,
      options: {
        pskCallback: () => ({ psk: key, identity }),
        ciphers: PSK_CIPHERS,
        minVersion: 'TLSv1.2',
        // No certificate in PSK mode: the key is the server's proof of identity.
        checkServerIdentity: () => undefined,
      },
    };
  }
  const verify = t.verifyPeer ?? true;
  const dir = t.certificates ?? defaultCertificateDir();
  const options: ConnectionOptions = { minVersion: 'TLSv1.2', rejectUnauthorized: verify };
  let describe = 'X.509';
  if (dir !== undefined) {
    const caFile = join(dir, 'ca-cert.pem');
    if (existsSync(caFile)) {
      options.ca = readOrFail(caFile, 'the CA certificate');
      describe += ` (CA ${caFile})`;
    } else if (verify) {
      throw new TlsConfigError(`${caFile} does not exist (needed to verify the server; or tls-verify-peer=false)`);
    }
    const cert = join(dir, 'client-cert.pem');
    const key = join(dir, 'client-key.pem');
    if (existsSync(cert) && existsSync(key)) {
      options.cert = readOrFail(cert, 'the client certificate');
      options.key = readOrFail(key, 'the client key');
      describe += ', client certificate';
    }
  }
  const host = t.hostname ?? (uri.transport.kind === 'tcp' ? uri.transport.host : undefined);
  if (host !== undefined && isIP(host) === 0) options.servername = host;
  options.checkServerIdentity = (_name, cert) =>
    !verify || host === undefined ? undefined : checkServerIdentity(host, cert);
  return { kind: 'x509', describe, options };
}

/**
 * Run the TLS handshake on `socket` (after the server acknowledged
 * NBD_OPT_STARTTLS). Resolves with the TLS socket once it is secure; rejects
 * with the handshake's error, and destroys both sockets, if it fails or
 * `signal` aborts.
 */
export function upgrade(socket: Socket, config: TlsConfig, signal?: AbortSignal): Promise<TLSSocket> {
  return new Promise<TLSSocket>((resolve, reject) => {
    const tls = tlsConnect({ ...config.options, socket });
    const onAbort = (): void => {
      done(new Error('aborted'));
    };
    const done = (err: Error | undefined): void => {
      tls.off('secureConnect', onSecure);
      tls.off('error', done);
      tls.off('close', onClose);
      signal?.removeEventListener('abort', onAbort);
      if (err) {
        // Whatever the dying socket still reports has been reported here.
        tls.on('error', () => undefined);
        tls.destroy();
        socket.destroy();
        reject(err);
      } else {
        resolve(tls);
      }
    };
    const onSecure = (): void => {
      done(undefined);
    };
    const onClose = (): void => {
      done(new Error('the server closed the connection during the TLS handshake'));
    };
    tls.once('secureConnect', onSecure);
    tls.once('error', done);
    tls.once('close', onClose);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
