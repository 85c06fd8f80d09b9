//! Stage 1: bounds-checked parsing of Ethernet / IPv4 / TCP-UDP headers, for any entry point
//! that has `data`/`data_end` pointers (TC and XDP alike).
use lb_common::{PROTO_TCP, PROTO_UDP, stats::Counter};

use crate::Verdict;

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const L4_OFF: usize = ETH_LEN + IPV4_LEN;
const ETH_P_IP: u16 = 0x0800;

/// Addresses and ports of one IPv4 TCP/UDP packet, all as on the wire.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub protocol: u8,
}

impl Flow {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.protocol == PROTO_TCP {
            L4_OFF + 16
        } else {
            L4_OFF + 6
        }
    }
}

#[inline(always)]
pub fn bytes<const N: usize>(data: usize, data_end: usize, off: usize) -> Result<[u8; N], Verdict> {
    if data + off + N > data_end {
        return Err(Verdict::Pass(Counter::PassTruncated));
    }
    // SAFETY: bounds checked against data_end just above.
    Ok(unsafe { *((data + off) as *const [u8; N]) })
}

/// Headers every translated packet has: Ethernet, IPv4 without options, a TCP header.
pub const MAX_HEADERS: usize = L4_OFF + 20;

/// Parses the headers, which must lie in `data..data_end`; `packet_len` is the whole frame's
/// length, which for a TC skb can exceed the directly readable (linear) part.
#[inline(always)]
pub fn parse(data: usize, data_end: usize, packet_len: usize) -> Result<Flow, Verdict> {
    let eth: [u8; ETH_LEN] = bytes(data, data_end, 0)?;
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IP {
        return Err(Verdict::Pass(Counter::PassNotIpv4));
    }
    let ip: [u8; IPV4_LEN] = bytes(data, data_end, ETH_LEN)?;
    if ip[0] >> 4 != 4 {
        return Err(Verdict::Pass(Counter::PassNotIpv4));
    }
    let ihl = ip[0] & 0x0f;
    if ihl < 5 {
        return Err(Verdict::Pass(Counter::PassTruncated));
    }
    if ihl > 5 {
        return Err(Verdict::Pass(Counter::PassIpOptions));
    }
    let protocol = ip[9];
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Err(Verdict::Pass(Counter::PassNotTcpUdp));
    }
    // More-fragments flag or a fragment offset: no complete L4 header to translate.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(Verdict::Pass(Counter::PassFragment));
    }
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4_min = if protocol == PROTO_TCP { 20 } else { 8 };
    if total_len < IPV4_LEN + l4_min || ETH_LEN + total_len > packet_len {
        return Err(Verdict::Pass(Counter::PassTruncated));
    }
    let ports: [u8; 4] = bytes(data, data_end, L4_OFF)?;
    Ok(Flow {
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        protocol,
    })
}
