//! ICMP errors about translated flows: finding the flow an error quotes and rewriting the
//! quoted headers, the outer header and every checksum. Pure arithmetic on a copy of the
//! headers, shared by the datapath and the tests.
//!
//! The copy starts at the outer IPv4 header: outer IPv4 (20 bytes, no options), ICMP header
//! (8), quoted IPv4 header (20, no options), then the quoted datagram's first bytes: 8 for
//! the ports (RFC 792), 18 when the quote reaches a TCP header's checksum.
use crate::{PROTO_TCP, PROTO_UDP, checksum};

pub const PROTO_ICMP: u8 = 1;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_FRAG_NEEDED: u8 = 4;

const OUTER_CSUM: usize = 10;
const OUTER_SRC: usize = 12;
const OUTER_DST: usize = 16;
const ICMP: usize = 20;
const QUOTE: usize = ICMP + 8;
const QUOTE_L4: usize = QUOTE + 20;
const UDP_CSUM: usize = QUOTE_L4 + 6;
const TCP_CSUM: usize = QUOTE_L4 + 16;

/// Headers up to the quoted ports.
pub const SHORT_LEN: usize = QUOTE_L4 + 8;
/// Headers up to the end of a quoted TCP checksum.
pub const LONG_LEN: usize = TCP_CSUM + 2;

pub type Headers = [u8; LONG_LEN];

/// The flow of the datagram an ICMP error quotes, as that datagram was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub protocol: u8,
}

/// Which end of the quoted datagram is translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The quoted source: an error sent by a client about a reply it got from a Service
    /// address, on its way to the backend that really sent it.
    Source,
    /// The quoted destination: an error about a client's datagram sent on to a backend, on its
    /// way back to the client.
    Destination,
}

#[inline(always)]
fn word(h: &Headers, off: usize) -> u16 {
    u16::from_be_bytes([h[off], h[off + 1]])
}

#[inline(always)]
fn put_word(h: &mut Headers, off: usize, v: u16) {
    let b = v.to_be_bytes();
    h[off] = b[0];
    h[off + 1] = b[1];
}

#[inline(always)]
fn addr(h: &Headers, off: usize) -> [u8; 4] {
    [h[off], h[off + 1], h[off + 2], h[off + 3]]
}

#[inline(always)]
fn put_addr(h: &mut Headers, off: usize, a: [u8; 4]) {
    h[off] = a[0];
    h[off + 1] = a[1];
    h[off + 2] = a[2];
    h[off + 3] = a[3];
}

/// RFC 1624 incremental update of a checksum field when one covered 16-bit word changes.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !checksum::fold(sum)
}

/// The quoted flow of a destination-unreachable or time-exceeded error whose outer header
/// (already checked: IPv4, no options, ICMP, not a fragment) starts `h`; `None` for any other
/// ICMP message or a quote without TCP/UDP ports.
#[inline(always)]
pub fn quoted(h: &Headers) -> Option<Quoted> {
    let kind = h[ICMP];
    if kind != ICMP_DEST_UNREACHABLE && kind != ICMP_TIME_EXCEEDED {
        return None;
    }
    // A quoted header with options or of a non-first fragment has no ports where we look.
    if h[QUOTE] != 0x45 || word(h, QUOTE + 6) & 0x1fff != 0 {
        return None;
    }
    let protocol = h[QUOTE + 9];
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return None;
    }
    Some(Quoted {
        src: addr(h, QUOTE + 12),
        dst: addr(h, QUOTE + 16),
        sport: u16::from_ne_bytes([h[QUOTE_L4], h[QUOTE_L4 + 1]]),
        dport: u16::from_ne_bytes([h[QUOTE_L4 + 2], h[QUOTE_L4 + 3]]),
        protocol,
    })
}

/// The outer header's source and destination addresses.
#[inline(always)]
pub fn outer_addresses(h: &Headers) -> ([u8; 4], [u8; 4]) {
    (addr(h, OUTER_SRC), addr(h, OUTER_DST))
}

/// Rewrites the quoted datagram's `end` to `addr`:`port` (port in network byte order), and the
/// outer address on the same side when it is the one replaced (the backend itself sent the
/// error, or it is addressed to the Service). `len` is how many bytes of `h` the packet has
/// (at least [`SHORT_LEN`]): a quoted TCP checksum is updated only when it is there. The
/// quoted IPv4 and L4 checksums, the ICMP checksum and the outer IPv4 checksum all stay valid.
#[inline(always)]
pub fn translate(h: &mut Headers, len: usize, end: End, addr: [u8; 4], port: u16) {
    let (addr_off, port_off, outer_off) = match end {
        End::Source => (QUOTE + 12, QUOTE_L4, OUTER_DST),
        End::Destination => (QUOTE + 16, QUOTE_L4 + 2, OUTER_SRC),
    };
    let old_addr = self::addr(h, addr_off);
    let old_port = word(h, port_off);
    let new_port = u16::from_be_bytes(port.to_ne_bytes());
    let mut icmp_csum = word(h, ICMP + 2);

    let old_ip_csum = word(h, QUOTE + 10);
    let new_ip_csum = checksum::replace4(old_ip_csum, old_addr, addr);
    put_word(h, QUOTE + 10, new_ip_csum);
    icmp_csum = replace2(icmp_csum, old_ip_csum, new_ip_csum);

    // The quoted L4 checksum covers the whole original datagram, pseudo-header included.
    let l4_csum_off = if h[QUOTE + 9] == PROTO_UDP {
        // Zero: the sender computed none.
        if word(h, UDP_CSUM) != 0 { UDP_CSUM } else { 0 }
    } else if len >= LONG_LEN {
        TCP_CSUM
    } else {
        0
    };
    if l4_csum_off != 0 {
        let old = word(h, l4_csum_off);
        let mut new = replace2(checksum::replace4(old, old_addr, addr), old_port, new_port);
        if new == 0 && l4_csum_off == UDP_CSUM {
            new = 0xffff;
        }
        put_word(h, l4_csum_off, new);
        icmp_csum = replace2(icmp_csum, old, new);
    }

    put_addr(h, addr_off, addr);
    put_word(h, port_off, new_port);
    icmp_csum = checksum::replace4(icmp_csum, old_addr, addr);
    icmp_csum = replace2(icmp_csum, old_port, new_port);
    put_word(h, ICMP + 2, icmp_csum);

    if self::addr(h, outer_off) == old_addr {
        put_addr(h, outer_off, addr);
        let c = checksum::replace4(word(h, OUTER_CSUM), old_addr, addr);
        put_word(h, OUTER_CSUM, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::{add_bytes, checksum, finish, ipv4_pseudo_header_sum};
    use std::{vec, vec::Vec};

    const CLIENT: [u8; 4] = [198, 18, 1, 1];
    const VIP: [u8; 4] = [198, 19, 0, 10];
    const BACKEND: [u8; 4] = [198, 18, 2, 1];
    const ROUTER: [u8; 4] = [198, 18, 254, 1];

    fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, payload_len: usize) -> [u8; 20] {
        let total = (20 + payload_len) as u16;
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&[0x12, 0x34]);
        h[6] = 0x40;
        h[8] = 63;
        h[9] = protocol;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    /// A whole datagram with a valid L4 checksum.
    fn datagram(protocol: u8, src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
        let payload = b"some payload bytes";
        let mut l4 = Vec::new();
        l4.extend_from_slice(&src.1.to_be_bytes());
        l4.extend_from_slice(&dst.1.to_be_bytes());
        if protocol == PROTO_TCP {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(payload);
        let sum = ipv4_pseudo_header_sum(src.0, dst.0, protocol, l4.len() as u16);
        let c = finish(add_bytes(sum, &l4));
        let off = if protocol == PROTO_TCP { 16 } else { 6 };
        l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
        let mut d = ipv4(src.0, dst.0, protocol, l4.len()).to_vec();
        d.extend_from_slice(&l4);
        d
    }

    /// An ICMP error from `from` to `to` quoting `quote_len` bytes of `original`.
    fn error(from: [u8; 4], to: [u8; 4], kind: u8, original: &[u8], quote_len: usize) -> Vec<u8> {
        let mut icmp = vec![kind, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&original[..quote_len]);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut e = ipv4(from, to, PROTO_ICMP, icmp.len()).to_vec();
        e.extend_from_slice(&icmp);
        e
    }

    fn headers(packet: &[u8]) -> (Headers, usize) {
        let mut h = [0u8; LONG_LEN];
        let len = packet.len().min(LONG_LEN);
        h[..len].copy_from_slice(&packet[..len]);
        (h, len)
    }

    fn net(port: u16) -> u16 {
        u16::from_ne_bytes(port.to_be_bytes())
    }

    #[test]
    fn error_toward_the_client_shows_the_service_in_quote_and_source() {
        for protocol in [PROTO_TCP, PROTO_UDP] {
            // The client sent to the Service; the datapath sent it on to the backend.
            let original = datagram(protocol, (CLIENT, 40000), (BACKEND, 8080));
            for (sender, quote_len) in [(BACKEND, 28), (ROUTER, 28), (BACKEND, original.len())] {
                let packet = error(sender, CLIENT, ICMP_DEST_UNREACHABLE, &original, quote_len);
                let (mut h, len) = headers(&packet);
                let q = quoted(&h).expect("quoted flow");
                assert_eq!(
                    (q.src, q.dst, q.sport, q.dport),
                    (CLIENT, BACKEND, net(40000), net(8080))
                );
                translate(&mut h, len, End::Destination, VIP, net(80));
                let mut out = packet.clone();
                out[..len].copy_from_slice(&h[..len]);

                assert_eq!(checksum(&out[..20]), 0, "outer IPv4 checksum");
                assert_eq!(checksum(&out[ICMP..]), 0, "ICMP checksum");
                assert_eq!(checksum(&out[QUOTE..QUOTE + 20]), 0, "quoted IPv4 checksum");
                let q = quoted(&h).unwrap();
                assert_eq!((q.dst, q.dport), (VIP, net(80)));
                assert_eq!((q.src, q.sport), (CLIENT, net(40000)));
                let expected_sender = if sender == BACKEND { VIP } else { ROUTER };
                assert_eq!(&out[12..16], &expected_sender, "outer source");
                assert_eq!(&out[16..20], &CLIENT);
                let mut expected = datagram(protocol, (CLIENT, 40000), (VIP, 80));
                expected.truncate(quote_len);
                if protocol == PROTO_TCP && quote_len < 38 {
                    // The TCP checksum was not quoted: nothing to compare beyond the ports.
                    assert_eq!(&out[QUOTE..QUOTE + 24], &expected[..24]);
                } else {
                    // Checksums included: the quoted L4 checksum is right for the whole datagram.
                    assert_eq!(
                        &out[QUOTE..],
                        &expected[..],
                        "quote as if sent to the Service"
                    );
                }
            }
        }
    }

    #[test]
    fn error_from_the_client_goes_to_the_backend() {
        // The backend replied; the datapath showed the reply as coming from the Service.
        let original = datagram(PROTO_UDP, (VIP, 53), (CLIENT, 40000));
        let packet = error(
            CLIENT,
            VIP,
            ICMP_DEST_UNREACHABLE,
            &original,
            original.len(),
        );
        let (mut h, len) = headers(&packet);
        translate(&mut h, len, End::Source, BACKEND, net(5353));
        let mut out = packet.clone();
        out[..len].copy_from_slice(&h[..len]);
        assert_eq!(&out[16..20], &BACKEND, "outer destination is the backend");
        assert_eq!(checksum(&out[..20]), 0);
        assert_eq!(checksum(&out[ICMP..]), 0);
        let expected = datagram(PROTO_UDP, (BACKEND, 5353), (CLIENT, 40000));
        assert_eq!(&out[QUOTE..], &expected[..]);
    }

    #[test]
    fn udp_without_checksum_keeps_none() {
        let mut original = datagram(PROTO_UDP, (CLIENT, 40000), (BACKEND, 8080));
        original[26] = 0;
        original[27] = 0;
        let packet = error(
            BACKEND,
            CLIENT,
            ICMP_DEST_UNREACHABLE,
            &original,
            original.len(),
        );
        let (mut h, len) = headers(&packet);
        translate(&mut h, len, End::Destination, VIP, net(80));
        assert_eq!(word(&h, UDP_CSUM), 0);
        let mut out = packet.clone();
        out[..len].copy_from_slice(&h[..len]);
        assert_eq!(checksum(&out[ICMP..]), 0);
    }

    #[test]
    fn other_messages_and_quotes_without_ports_are_not_errors_of_a_flow() {
        let original = datagram(PROTO_TCP, (CLIENT, 40000), (BACKEND, 8080));
        let echo = error(BACKEND, CLIENT, 8, &original, 28);
        assert_eq!(quoted(&headers(&echo).0), None, "echo request");
        let exceeded = error(ROUTER, CLIENT, ICMP_TIME_EXCEEDED, &original, 28);
        assert!(quoted(&headers(&exceeded).0).is_some(), "time exceeded");
        let mut later = original.clone();
        later[6] = 0x00;
        later[7] = 0x10;
        let fragment = error(ROUTER, CLIENT, ICMP_DEST_UNREACHABLE, &later, 28);
        assert_eq!(
            quoted(&headers(&fragment).0),
            None,
            "quote of a later fragment"
        );
        let mut icmp_quote = original.clone();
        icmp_quote[9] = PROTO_ICMP;
        let inner_icmp = error(ROUTER, CLIENT, ICMP_DEST_UNREACHABLE, &icmp_quote, 28);
        assert_eq!(
            quoted(&headers(&inner_icmp).0),
            None,
            "quote of an ICMP message"
        );
    }
}
