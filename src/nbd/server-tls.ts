// TLS for ubcache's own NBD server (export, serve), with nbdkit's options and
// meanings:
//
//   --tls=off|on|require   off: NBD_OPT_STARTTLS is refused; on: clients may
//                          upgrade; require: every option but STARTTLS and
//                          ABORT is answered NBD_REP_ERR_TLS_REQD until they do
//   --tls-certificates=DIR X.509: DIR/server-cert.pem and DIR/server-key.pem,
//                          and DIR/ca-cert.pem to verify clients
//   --tls-psk=FILE         PSK: "username:hexkey" lines, as psktool writes them
//   --tls-verify-peer      X.509 only: clients must present a certificate the
//                          CA signed
//
// Without --tls-certificates or --tls-psk, nbdkit's default directory is used
// as nbdkit does: /etc/pki/nbdkit for root, else $HOME/.pki/nbdkit.
//
// The upgrade itself (handshake.ts): STARTTLS is acknowledged in clear, then
// the TLS handshake runs on the same socket and the option haggling starts
// over inside TLS (proto.md "TLS support"); whatever the client negotiated in
// clear is forgotten.

import { existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createSecureContext, createServer, type TLSSocket, type TlsOptions } from 'node:tls';
import type { Socket } from 'node:net';
import { parsePskFile, PSK_CIPHERS, readOrFail, TlsConfigError } from './tls.ts';

export type ServerTlsMode = 'off' | 'on' | 'require';

export interface ServerTlsSettings {
  mode: ServerTlsMode;
  certificates?: string;
  psk?: string;
  verifyPeer?: boolean;
}

/** What a server needs to upgrade its connections; resolved once, at start (files read then). */
export interface ServerTls {
  /** Clients must upgrade before anything else. */
  required: boolean;
  /** For logs: "PSK (keys.psk, 2 users)", "X.509 (/etc/pki/nbdkit)". */
  describe: string;
  options: TlsOptions;
}

/** nbdkit's default certificate directory. */
function defaultCertificateDir(): string {
  return process.getuid?.() === 0 ? '/etc/pki/nbdkit' : join(homedir(), '.pki', 'nbdkit');
}

/** Resolve the settings: undefined for --tls=off; a TlsConfigError saying what is missing otherwise. */
export function loadServerTls(s: ServerTlsSettings): ServerTls | undefined {
  if (s.mode === 'off') {
    if (s.certificates !== undefined || s.psk !== undefined || s.verifyPeer === true) {
      throw new TlsConfigError('--tls-certificates, --tls-psk and --tls-verify-peer need --tls=on or --tls=require');
    }
    return undefined;
  }
  const required = s.mode === 'require';
  if (s.psk !== undefined) {
    if (s.certificates !== undefined) {
      throw new TlsConfigError('--tls-psk and --tls-certificates exclude each other: choose PSK or X.509');
    }
    if (s.verifyPeer === true) {
      throw new TlsConfigError('--tls-verify-peer applies to X.509 certificates; with --tls-psk the key is the proof');
    }
    const keys = parsePskFile(readOrFail(s.psk, 'the PSK file').toString('utf8'), s.psk);
    if (keys.size === 0) throw new TlsConfigError(`${s.psk} holds no keys (psktool -u USER -p ${s.psk} adds one)`);
    return {
      required,
      describe: `PSK (${s.psk}, ${keys.size} user(s))`,
      options: {
        // A client naming an unknown user gets no key: the handshake fails for it alone.
        pskCallback: (_socket, identity) => keys.get(identity) ?? null,
        ciphers: PSK_CIPHERS,
        minVersion: 'TLSv1.2',
      },
    };
  }
  const dir = s.certificates ?? defaultCertificateDir();
  const where =
    s.certificates === undefined ? ` (nbdkit's default; give --tls-certificates=DIR or --tls-psk=FILE)` : '';
  const certFile = join(dir, 'server-cert.pem');
  const keyFile = join(dir, 'server-key.pem');
  const caFile = join(dir, 'ca-cert.pem');
  for (const f of [certFile, keyFile]) {
    if (!existsSync(f)) throw new TlsConfigError(`${f} does not exist${where}`);
  }
  const options: TlsOptions = {
    cert: readOrFail(certFile, 'the server certificate'),
    key: readOrFail(keyFile, 'the server key'),
    minVersion: 'TLSv1.2',
  };
  const verify = s.verifyPeer === true;
  if (verify) {
    if (!existsSync(caFile)) throw new TlsConfigError(`--tls-verify-peer needs ${caFile} to verify clients with`);
    options.ca = readOrFail(caFile, 'the CA certificate');
    options.requestCert = true;
    options.rejectUnauthorized = true;
  }
  try {
    // Refuse a mismatched or unreadable key now, at start, rather than at each client's handshake.
    createSecureContext(options);
  } catch (err) {
    throw new TlsConfigError(`${dir}: ${err instanceof Error ? err.message : String(err)}`);
  }
  return { required, describe: `X.509 (${dir}${verify ? ', clients verified' : ''})`, options };
}

/**
 * Run the server side of the TLS handshake on `socket`, after NBD_OPT_STARTTLS
 * was acknowledged. Resolves with the TLS socket once secure; rejects (with
 * the socket destroyed) if the handshake fails, a client certificate is
 * refused, or the socket closes.
 *
 * A tls.Server that never listens is handed the socket: it is what applies
 * requestCert/rejectUnauthorized (a TLSSocket made by hand would report a
 * refused client certificate without acting on it, and would not say why).
 */
export function acceptTls(socket: Socket, tls: ServerTls): Promise<TLSSocket> {
  return new Promise<TLSSocket>((resolve, reject) => {
    const server = createServer(tls.options);
    const done = (err: Error | undefined, secure?: TLSSocket): void => {
      server.off('secureConnection', onSecure);
      server.off('tlsClientError', onClientError);
      socket.off('close', onClose);
      if (err || !secure) {
        socket.destroy();
        reject(err ?? new Error('no TLS socket'));
      } else {
        resolve(secure);
      }
    };
    const onSecure = (secure: TLSSocket): void => {
      done(undefined, secure);
    };
    const onClientError = (err: Error): void => {
      // OpenSSL's message is a dump of its error queue; its reason alone says what the client did.
      const reason = 'reason' in err && typeof err.reason === 'string' ? err.reason : undefined;
      done(reason === undefined ? err : new Error(reason, { cause: err }));
    };
    const onClose = (): void => {
      done(new Error('the client closed the connection during the TLS handshake'));
    };
    server.once('secureConnection', onSecure);
    server.once('tlsClientError', onClientError);
    socket.once('close', onClose);
    server.emit('connection', socket);
  });
}
