//! Builds and checks Ethernet/IPv4/TCP/UDP frames for BPF_PROG_TEST_RUN tests and benchmarks.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use lb_common::checksum;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// An IPv4 frame with a TCP (SYN, 20-byte header) or UDP header and `payload`, all checksums valid.
pub fn ipv4_frame(
    protocol: u8,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let l4_header = if protocol == TCP { 20 } else { 8 };
    let l4_len = l4_header + payload.len();
    let mut f = Vec::with_capacity(14 + 20 + l4_len);
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4_len) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0x12,
        0x34,
        0x40,
        0,
        64,
        protocol,
        0,
        0,
    ]);
    f.extend_from_slice(&src.0.octets());
    f.extend_from_slice(&dst.0.octets());
    let ip_csum = checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&ip_csum.to_be_bytes());
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    if protocol == TCP {
        // seq, ack, offset 5, SYN, window, csum, urgent
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend_from_slice(&(l4_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f.extend_from_slice(payload);
    let csum = l4_checksum(&f);
    let off = if protocol == TCP { 34 + 16 } else { 34 + 6 };
    f[off..off + 2].copy_from_slice(&csum.to_be_bytes());
    f
}

/// A TCP frame of `src` -> `dst` with `flags`, all checksums valid.
pub fn tcp_with_flags(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    let mut f = ipv4_frame(TCP, src, dst, b"");
    f[47] = flags;
    let csum = l4_checksum(&f);
    f[50..52].copy_from_slice(&csum.to_be_bytes());
    f
}

/// The L4 checksum a correct sender would put in `frame` (its field taken as zero).
pub fn l4_checksum(frame: &[u8]) -> u16 {
    let protocol = frame[23];
    let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let l4 = &frame[34..14 + total];
    let mut copy = l4.to_vec();
    let off = if protocol == TCP { 16 } else { 6 };
    copy[off] = 0;
    copy[off + 1] = 0;
    let src: [u8; 4] = frame[26..30].try_into().unwrap();
    let dst: [u8; 4] = frame[30..34].try_into().unwrap();
    let sum = checksum::ipv4_pseudo_header_sum(src, dst, protocol, l4.len() as u16);
    let c = checksum::finish(checksum::add_bytes(sum, &copy));
    if protocol == UDP && c == 0 { 0xffff } else { c }
}

pub fn ip_checksum_valid(frame: &[u8]) -> bool {
    checksum::checksum(&frame[14..34]) == 0
}

pub fn l4_checksum_valid(frame: &[u8]) -> bool {
    let off = if frame[23] == TCP { 34 + 16 } else { 34 + 6 };
    u16::from_be_bytes([frame[off], frame[off + 1]]) == l4_checksum(frame)
}

pub fn src(frame: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]),
        u16::from_be_bytes([frame[34], frame[35]]),
    )
}

pub fn dst(frame: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]),
        u16::from_be_bytes([frame[36], frame[37]]),
    )
}

/// An Ethernet frame carrying an ICMP error (`kind`, `code`) from `from` to `to` that quotes
/// the first `quote_len` bytes of `original`'s IPv4 datagram; every checksum valid.
pub fn icmp_error_frame(
    from: Ipv4Addr,
    to: Ipv4Addr,
    kind: u8,
    code: u8,
    original: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0, 0];
    if kind == 3 && code == 4 {
        // Fragmentation needed: next-hop MTU.
        icmp[6..8].copy_from_slice(&1200u16.to_be_bytes());
    }
    icmp.extend_from_slice(&original[14..14 + quote_len]);
    let c = checksum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + icmp.len()) as u16;
    f.extend_from_slice(&[0x45, 0xc0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    f.extend_from_slice(&from.octets());
    f.extend_from_slice(&to.octets());
    let ip_csum = checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&ip_csum.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

/// Splits a frame's IPv4 datagram into fragments of at most `chunk` payload bytes (a
/// multiple of 8), each with a valid IPv4 checksum, as a sender's kernel does.
pub fn fragments(frame: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    assert_eq!(chunk % 8, 0);
    let payload = &frame[34..];
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let end = (off + chunk).min(payload.len());
        let mut f = frame[..34].to_vec();
        f.extend_from_slice(&payload[off..end]);
        let total = (20 + end - off) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let more = if end < payload.len() { 0x2000 } else { 0 };
        let frag = more | (off / 8) as u16;
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        out.push(f);
        off = end;
    }
    out
}

/// Joins fragments (in any order) back into one frame, as the receiver's kernel does.
pub fn reassemble(fragments: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, &[u8])> = fragments
        .iter()
        .map(|f| {
            let off = (u16::from_be_bytes([f[20], f[21]]) & 0x1fff) as usize * 8;
            (off, &f[34..])
        })
        .collect();
    parts.sort_by_key(|p| p.0);
    let first = fragments
        .iter()
        .find(|f| u16::from_be_bytes([f[20], f[21]]) & 0x1fff == 0)
        .expect("first fragment");
    let mut whole = first[..34].to_vec();
    for (off, data) in parts {
        assert_eq!(whole.len() - 34, off, "fragments are contiguous");
        whole.extend_from_slice(data);
    }
    let total = (whole.len() - 14) as u16;
    whole[16..18].copy_from_slice(&total.to_be_bytes());
    whole[20..22].copy_from_slice(&[0, 0]);
    whole
}
