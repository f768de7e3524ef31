// The server TLS options of `export` and `serve`, with nbdkit's names and
// meanings (nbd/server-tls.ts): --tls=off|on|require, --tls-certificates=DIR,
// --tls-psk=FILE, --tls-verify-peer.

import { loadServerTls, type ServerTls, type ServerTlsMode, type ServerTlsSettings } from '../nbd/server-tls.ts';
import { TlsConfigError } from '../nbd/tls.ts';
import { CliError } from './common.ts';

/** For parseCommandArgs. */
export const TLS_OPTIONS = {
  tls: { type: 'string' },
  'tls-certificates': { type: 'string' },
  'tls-psk': { type: 'string' },
  'tls-verify-peer': { type: 'boolean' },
} as const;

const TLS_HELP_ENTRIES: [string, string[]][] = [
  [
    '--tls=off|on|require',
    [
      'TLS as nbdkit does it: on lets clients upgrade',
      '(NBD_OPT_STARTTLS, nbds:// URIs), require refuses',
      'every client that does not (default off)',
    ],
  ],
  [
    '--tls-certificates=DIR',
    [
      'X.509: DIR/server-cert.pem, DIR/server-key.pem and,',
      'for --tls-verify-peer, DIR/ca-cert.pem (default',
      '/etc/pki/nbdkit for root, else ~/.pki/nbdkit)',
    ],
  ],
  ['--tls-psk=FILE', ['PSK instead: username:hexkey lines (psktool -u USER', '-p FILE writes them)']],
  ['--tls-verify-peer', ['X.509: clients must present a certificate signed', 'by DIR/ca-cert.pem']],
];

/** The options' help lines, descriptions starting at `column` as in the command's own help. */
export function tlsHelp(column: number): string {
  let out = '';
  for (const [flag, lines] of TLS_HELP_ENTRIES) {
    const head = `  ${flag}`;
    const [first, ...rest] = lines;
    if (head.length + 2 > column) out += `${head}\n${' '.repeat(column)}${first ?? ''}\n`;
    else out += `${head.padEnd(column)}${first ?? ''}\n`;
    for (const l of rest) out += `${' '.repeat(column)}${l}\n`;
  }
  return out;
}

interface TlsValues {
  tls?: string;
  'tls-certificates'?: string;
  'tls-psk'?: string;
  'tls-verify-peer'?: boolean;
}

/** The settings from the parsed values, checked for shape only (files are read by loadTls). */
export function parseTlsOptions(v: TlsValues, usageHint: string): ServerTlsSettings {
  const mode = v.tls ?? 'off';
  if (mode !== 'off' && mode !== 'on' && mode !== 'require') {
    throw new CliError(`--tls=${mode}: expected off, on or require`, { hint: usageHint });
  }
  for (const name of ['tls-certificates', 'tls-psk'] as const) {
    if (v[name] === '') throw new CliError(`--${name} needs a path`, { hint: usageHint });
  }
  const settings: ServerTlsSettings = { mode: mode satisfies ServerTlsMode };
  if (v['tls-certificates'] !== undefined) settings.certificates = v['tls-certificates'];
  if (v['tls-psk'] !== undefined) settings.psk = v['tls-psk'];
  if (v['tls-verify-peer'] === true) settings.verifyPeer = true;
  // The combinations are checked now, before anything is opened; the files when the server starts.
  if (mode === 'off') loadTls(settings);
  return settings;
}

/** Read the keys and certificates: undefined for --tls=off; a CliError naming what is wrong. */
export function loadTls(settings: ServerTlsSettings): ServerTls | undefined {
  try {
    return loadServerTls(settings);
  } catch (err) {
    if (err instanceof TlsConfigError) {
      throw new CliError(`TLS: ${err.message}`, {
        hint: 'Make keys with psktool -u USER -p FILE, or certificates as nbdkit-tls(1) describes.',
      });
    }
    throw err;
  }
}
