// NBD URIs: the examples of doc/uri.md and libnbd's nbd_connect_uri(3), and
// the URIs that must be refused with a reason.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeTransport, isNbdUri, NbdUriError, parseNbdUri } from '../../src/nbd/uri.ts';

test('uri.md export names: the path without its leading slash, percent-decoded', () => {
  const cases: Array<[string, string]> = [
    ['nbd://example.com/disk', 'disk'],
    ['nbd+unix:///disk?socket=sock', 'disk'],
    ['nbd://example.com/', ''],
    ['nbd://example.com', ''],
    ['nbd://example.com//disk', '/disk'],
    ['nbd://example.com/hello%20world', 'hello world'],
    ['nbd://example.com/a+b', 'a+b'],
    ['nbd://example.com/%C3%A9t%C3%A9', 'été'],
    ['nbd://example.com/été', 'été'],
    ['nbd://example.com/a%2Fb%3Fc%23d', 'a/b?c#d'],
  ];
  for (const [uri, name] of cases) assert.equal(parseNbdUri(uri).exportName, name, uri);
});

test('TCP: host, default port 10809, explicit ports, IPv6 literals, empty host is localhost', () => {
  assert.deepEqual(parseNbdUri('nbd://example.com').transport, { kind: 'tcp', host: 'example.com', port: 10809 });
  assert.deepEqual(parseNbdUri('nbd://example.com:1234/x').transport, {
    kind: 'tcp',
    host: 'example.com',
    port: 1234,
  });
  assert.deepEqual(parseNbdUri('nbd://127.0.0.1:/x').transport, { kind: 'tcp', host: '127.0.0.1', port: 10809 });
  assert.deepEqual(parseNbdUri('nbd://[::1]:10810/d').transport, { kind: 'tcp', host: '::1', port: 10810 });
  assert.deepEqual(parseNbdUri('nbd://[fe80::1%25eth0]/').transport, {
    kind: 'tcp',
    host: 'fe80::1%eth0',
    port: 10809,
  });
  assert.deepEqual(parseNbdUri('nbd:///disk').transport, { kind: 'tcp', host: 'localhost', port: 10809 });
  const u = parseNbdUri('NBD://Host/x');
  assert.equal(u.scheme, 'nbd', 'schemes are case-insensitive (RFC 3986)');
  assert.equal(describeTransport(parseNbdUri('nbd://[::1]:5/').transport), '[::1]:5');
  assert.equal(describeTransport(parseNbdUri('nbd://h/').transport), 'h:10809');
});

test('unix sockets: socket= is decoded, relative paths and abstract sockets are allowed', () => {
  const u = parseNbdUri('nbd+unix:///bcache0?socket=/run/ubcache/nbd.sock');
  assert.deepEqual(u.transport, { kind: 'unix', path: '/run/ubcache/nbd.sock' });
  assert.equal(u.exportName, 'bcache0');
  assert.equal(u.tls, false);
  assert.equal(describeTransport(u.transport), 'unix:/run/ubcache/nbd.sock');
  assert.deepEqual(parseNbdUri('nbd+unix://?socket=rel/x.sock').transport, { kind: 'unix', path: 'rel/x.sock' });
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/tmp/a%20b.sock').transport, {
    kind: 'unix',
    path: '/tmp/a b.sock',
  });
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=%00/abstract').transport, { kind: 'unix', path: '\0/abstract' });
  // libnbd's separators: & and ;
  assert.equal(parseNbdUri('nbd+unix:///x?tls-verify-peer=0;socket=/s').transport.kind, 'unix');
});

test('TLS schemes and their parameters parse', () => {
  const u = parseNbdUri(
    'nbds+unix://alice@/disk?socket=/tmp/s&tls-certificates=/etc/pki/nbd&tls-verify-peer=false&tls-hostname=srv',
  );
  assert.equal(u.tls, true);
  assert.equal(u.scheme, 'nbds+unix');
  assert.deepEqual(u.tlsOptions, {
    certificates: '/etc/pki/nbd',
    username: 'alice',
    verifyPeer: false,
    hostname: 'srv',
  });
  const p = parseNbdUri('nbds://srv:10999/x?tls-psk-file=/etc/keys.psk&tls-username=bob&tls-type=psk');
  assert.deepEqual(p.transport, { kind: 'tcp', host: 'srv', port: 10999 });
  assert.deepEqual(p.tlsOptions, { pskFile: '/etc/keys.psk', username: 'bob', type: 'psk' });
  assert.equal(parseNbdUri('nbds://h/?tls-verify-peer=1').tlsOptions.verifyPeer, true);
  assert.equal(parseNbdUri('nbd://h/').tlsOptions.verifyPeer, undefined);
});

test('bad URIs are refused with the reason', () => {
  const cases: Array<[string, RegExp]> = [
    ['/tmp/disk.img', /no scheme: an NBD URI starts with nbd:\/\//],
    ['http://example.com/', /unknown scheme 'http'/],
    ['nbd:disk', /it must begin with 'nbd:\/\/'/],
    ['nbd+vsock:///', /AF_VSOCK is not supported/],
    ['nbd+unix:///disk', /needs the socket: nbd\+unix:\/\/\/EXPORT\?socket=PATH/],
    ['nbd+unix:///disk?socket=', /socket= is empty/],
    ['nbd://host/disk?socket=/tmp/s', /socket= belongs to nbd\+unix URIs/],
    ['nbd+unix://host/disk?socket=/tmp/s', /names no host or port/],
    ['nbd://host:99999/', /port 99999 is not between 1 and 65535/],
    ['nbd://host:0/', /port 0 is not between 1 and 65535/],
    ['nbd://host:ab/', /port 'ab' is not a number/],
    ['nbd://::1/', /write the IPv6 address :: in brackets|in brackets/],
    ['nbd://[::1/', /has no closing '\]'/],
    ['nbd://[zz]/', /is not an IPv6 address/],
    ['nbd://host/a%2', /'%2' is not a percent-encoded byte/],
    ['nbd://host/a%zz', /'%zz' is not a percent-encoded byte/],
    ['nbd://host/a%ff', /not valid UTF-8/],
    ['nbd://host/a b', /must be percent-encoded \(as %20\)/],
    ['nbd://host/a%00b', /NUL byte/],
    ['nbd://host/x#frag', /a fragment \('#frag'\) means nothing/],
    ['nbd://host/x?sokcet=/tmp/s', /unknown query parameter 'sokcet'/],
    ['nbd+unix:///x?socket=/a&socket=/b', /'socket' is given twice/],
    ['nbd://host/x?=v', /has no name/],
    ['nbds://alice@h/?tls-username=bob', /'alice' and tls-username=bob disagree/],
    ['nbds://alice:secret@h/', /carry no passwords/],
    ['nbds://h/?tls-verify-peer=maybe', /tls-verify-peer=maybe: expected 0 or 1/],
    ['nbds://h/?tls-type=kerberos', /tls-type=kerberos: expected anon, x509 or psk/],
    [`nbd://h/${'x'.repeat(4097)}`, /longer than 4096 bytes/],
  ];
  for (const [uri, pattern] of cases) {
    assert.throws(
      () => parseNbdUri(uri),
      (err: unknown) => {
        assert.ok(err instanceof NbdUriError, `${uri}: ${String(err)}`);
        assert.match(err.message, pattern, uri);
        assert.ok(err.message.startsWith(`NBD URI '${uri}': `), err.message);
        return true;
      },
    );
  }
});

test('device specs are told from paths by their scheme', () => {
  for (const s of ['nbd://h/', 'nbds://h/', 'nbd+unix:///?socket=/s', 'nbds+unix:///?socket=/s', 'NBD://h', 'nbd:x']) {
    assert.ok(isNbdUri(s), s);
  }
  for (const s of ['disk.img', '/dev/sdb', 'file:nbd://x', 'faulty:fail@nbd://h/', './nbd://x', 'nbdx://h']) {
    assert.ok(!isNbdUri(s), s);
  }
});

test('outage-timeout and request-timeout: seconds, or with s/ms; anything else is refused with the reason', () => {
  assert.deepEqual(parseNbdUri('nbd+unix:///d?socket=/s&outage-timeout=30').timeouts, { outageMs: 30_000 });
  assert.deepEqual(parseNbdUri('nbd://h/d?outage-timeout=2.5s&request-timeout=500ms').timeouts, {
    outageMs: 2500,
    requestMs: 500,
  });
  assert.deepEqual(parseNbdUri('nbd://h/d?outage-timeout=0').timeouts, { outageMs: 0 });
  assert.deepEqual(parseNbdUri('nbd://h/d').timeouts, {});
  assert.throws(() => parseNbdUri('nbd://h/d?outage-timeout=-1'), /outage-timeout=-1: expected a number of seconds/);
  assert.throws(() => parseNbdUri('nbd://h/d?request-timeout=1m'), /request-timeout=1m: expected a number of seconds/);
});
