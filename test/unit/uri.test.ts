import { describe, expect, it } from 'vitest';
import { formatNbdUri, parseNbdUri } from '../../lib/nbd/uri.js';

describe('parseNbdUri', () => {
  it('parses TCP URIs with export names, ports and IPv6 literals', () => {
    expect(parseNbdUri('nbd://example.com/disk')).toMatchObject({ host: 'example.com', port: 10809, exportName: 'disk', tls: 'off' });
    expect(parseNbdUri('nbd://example.com:1234')).toMatchObject({ host: 'example.com', port: 1234, exportName: '' });
    expect(parseNbdUri('nbd://example.com//disk').exportName).toBe('/disk');
    expect(parseNbdUri('nbd://example.com/hello%20world').exportName).toBe('hello world');
    expect(parseNbdUri('nbd://[::1]:10810/x')).toMatchObject({ host: '::1', port: 10810, exportName: 'x' });
    expect(parseNbdUri('nbd://[fe80::1%25eth0]/')).toMatchObject({ host: 'fe80::1%eth0' });
    expect(parseNbdUri('nbds://alice@host/e')).toMatchObject({ tls: 'require', tlsUsername: 'alice', host: 'host' });
  });
  it('parses Unix socket URIs and TLS query parameters', () => {
    expect(parseNbdUri('nbd+unix:///?socket=/tmp/s')).toMatchObject({ socket: '/tmp/s', exportName: '', tls: 'off' });
    expect(parseNbdUri('nbd+unix:///?socket=/tmp/s').host).toBeUndefined();
    expect(parseNbdUri('nbd+unix:///ex%2Fport?socket=/tmp/a%20b')).toMatchObject({ socket: '/tmp/a b', exportName: 'ex/port' });
    expect(parseNbdUri('nbd+unix:///?socket=%00abstract').socket).toBe('\0abstract');
    const a = parseNbdUri('nbds+unix://bob@/e?socket=/s&tls-psk-file=/k.psk&tls-verify-peer=0&tls-hostname=h&tls-certificates=/d');
    expect(a).toMatchObject({ tls: 'require', tlsUsername: 'bob', tlsPskFile: '/k.psk', tlsVerifyPeer: false, tlsHostname: 'h', tlsCertificates: '/d' });
  });
  it('parses vsock URIs: nbd+vsock://CID[:PORT]/EXPORT, default port 10809', () => {
    expect(parseNbdUri('nbd+vsock://1/')).toEqual({ cid: 1, port: 10809, exportName: '', tls: 'off', tlsVerifyPeer: true });
    expect(parseNbdUri('nbd+vsock://3:4294967295/disk%201')).toMatchObject({ cid: 3, port: 4294967295, exportName: 'disk 1' });
    expect(parseNbdUri('nbd+vsock://2')).toMatchObject({ cid: 2, port: 10809, exportName: '' });
    expect(parseNbdUri('NBDS+VSOCK://alice@2:10810/e?tls-psk-file=/k')).toMatchObject({ cid: 2, port: 10810, tls: 'require', tlsUsername: 'alice', tlsPskFile: '/k' });
    expect(parseNbdUri('nbd+vsock://1/').host).toBeUndefined();
  });
  const bad: Array<[string, RegExp]> = [
    ['nbd+vsock:///e', /^invalid NBD URI: nbd\+vsock:\/\/ needs a CID: nbd\+vsock:\/\/CID\[:PORT\]\/EXPORT$/],
    ['nbd+vsock://host/', /^invalid NBD URI: bad vsock CID "host": expected CID\[:PORT\] in decimal$/],
    ['nbd+vsock://4294967296/', /^invalid NBD URI: bad vsock CID "4294967296"$/],
    ['nbd+vsock://1:4294967296/', /^invalid NBD URI: bad vsock port "4294967296"$/],
    ['nbd+vsock://1/?socket=/s', /only valid with nbd\+unix/],
    ['nbd+vsock://1/?tls-psk-file=/k', /non-TLS scheme/],
    ['http://x/', /unknown scheme "http"/],
    ['nbd:/x', /expected nbd:\/\//],
    ['/dev/sda', /expected nbd:\/\//],
    ['nbd+unix:///e', /needs \?socket=PATH/],
    ['nbd+unix://host/e?socket=/s', /takes no host/],
    ['nbd://h/?socket=/s', /only valid with nbd\+unix/],
    ['nbd://h/?frobnicate=1', /unknown query parameter "frobnicate"/],
    ['nbd://h:99999/', /bad port/],
    ['nbd://h/%zz', /malformed percent-encoding/],
    ['nbd://h/?tls-psk-file=/k', /non-TLS scheme/],
    ['nbds://h/?tls-verify-peer=maybe', /tls-verify-peer must be 0 or 1/],
  ];
  for (const [uri, re] of bad)
    it(`rejects ${uri}`, () => {
      expect(() => parseNbdUri(uri)).toThrow(re);
      try {
        parseNbdUri(uri);
      } catch (e) {
        expect(e).toMatchObject({ code: 'ERR_URI', endpoint: uri });
      }
    });
  it('formats what it parses', () => {
    for (const u of ['nbd://example.com/disk', 'nbds://alice@[::1]:1234/e', 'nbd+unix:///x?socket=/tmp/s', 'nbds+unix:///?socket=/s&tls-psk-file=/k', 'nbd+vsock://1/', 'nbds+vsock://bob@2:1234/e'])
      expect(formatNbdUri(parseNbdUri(u))).toBe(u);
  });
});
