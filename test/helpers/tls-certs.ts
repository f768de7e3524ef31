// TLS material for the TLS tests, made fresh by each test with GnuTLS's own
// tools (gnutls-bin), as a user would for nbdkit or qemu-nbd: a PSK file by
// psktool, and a CA with server and client certificates by certtool, laid
// out in the directories nbdkit's --tls-certificates and libnbd's
// tls-certificates expect.

import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { have } from './daemon.ts';

export const tlsTools = { psktool: have('psktool'), certtool: have('certtool') };

/** `psktool -u USER -p FILE` for each user: "user:hexkey" lines. Returns the file. */
export function makePskFile(dir: string, users: string[], name = 'keys.psk'): string {
  const file = join(dir, name);
  for (const u of users) execFileSync('psktool', ['-u', u, '-p', file], { stdio: 'ignore' });
  return file;
}

export interface Certificates {
  /** For servers: ca-cert.pem, server-cert.pem, server-key.pem. */
  serverDir: string;
  /** For clients: ca-cert.pem, client-cert.pem, client-key.pem (CN = the client name). */
  clientDir: string;
  /** For clients that only verify the server: ca-cert.pem alone. */
  caOnlyDir: string;
  /** Another CA's ca-cert.pem: a client trusting it must refuse the server. */
  otherCaDir: string;
}

function certtool(args: string[]): void {
  execFileSync('certtool', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

function makeCa(dir: string, cn: string): { cert: string; key: string } {
  mkdirSync(dir, { recursive: true });
  const key = join(dir, 'ca-key.pem');
  const cert = join(dir, 'ca-cert.pem');
  const info = join(dir, 'ca.info');
  writeFileSync(info, `cn = ${cn}\nca\ncert_signing_key\nexpiration_days = 2\n`);
  certtool(['--generate-privkey', '--key-type=ecdsa', '--outfile', key]);
  certtool(['--generate-self-signed', '--load-privkey', key, '--template', info, '--outfile', cert]);
  return { cert, key };
}

function issue(ca: { cert: string; key: string }, dir: string, who: 'server' | 'client', template: string): void {
  const key = join(dir, `${who}-key.pem`);
  const info = join(dir, `${who}.info`);
  writeFileSync(info, template);
  certtool(['--generate-privkey', '--key-type=ecdsa', '--outfile', key]);
  certtool([
    '--generate-certificate',
    '--load-ca-certificate',
    ca.cert,
    '--load-ca-privkey',
    ca.key,
    '--load-privkey',
    key,
    '--template',
    info,
    '--outfile',
    join(dir, `${who}-cert.pem`),
  ]);
}

/** A CA, a server certificate for localhost and 127.0.0.1, and a client certificate for `client`. */
export function makeCertificates(dir: string, client = 'alice'): Certificates {
  const ca = makeCa(join(dir, 'ca'), 'ubcache test CA');
  const serverDir = join(dir, 'server');
  const clientDir = join(dir, 'client');
  const caOnlyDir = join(dir, 'ca-only');
  for (const d of [serverDir, clientDir, caOnlyDir]) {
    mkdirSync(d, { recursive: true });
    copyFileSync(ca.cert, join(d, 'ca-cert.pem'));
  }
  issue(
    ca,
    serverDir,
    'server',
    'organization = ubcache tests\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n' +
      'tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n',
  );
  issue(
    ca,
    clientDir,
    'client',
    `organization = ubcache tests\ncn = ${client}\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n`,
  );
  const other = makeCa(join(dir, 'other-ca'), 'another CA');
  const otherCaDir = join(dir, 'other');
  mkdirSync(otherCaDir, { recursive: true });
  copyFileSync(other.cert, join(otherCaDir, 'ca-cert.pem'));
  return { serverDir, clientDir, caOnlyDir, otherCaDir };
}
