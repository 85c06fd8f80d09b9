//! Stage 1: bounds-checked parsing of Ethernet / IPv4 / TCP-UDP headers, for any entry point
//! that has `data`/`data_end` pointers (TC and XDP alike).
use lb_common::{PROTO_TCP, PROTO_UDP, icmp, stats::Counter};

use crate::Verdict;

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const L4_OFF: usize = ETH_LEN + IPV4_LEN;
/// Headers every translated packet has: Ethernet, IPv4 without options, a TCP header.
pub const MAX_HEADERS: usize = L4_OFF + 20;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFF: usize = 13;
/// 0x0800 as it lies in the packet, read as a native u16.
const ETH_P_IP_NET: u16 = u16::from_ne_bytes([0x08, 0x00]);
/// More-fragments flag and fragment offset, as they lie in the packet.
const IP_FRAGMENT_MASK_NET: u16 = u16::from_ne_bytes([0x3f, 0xff]);
/// Fragment offset alone, as it lies in the packet.
const IP_OFFSET_MASK_NET: u16 = u16::from_ne_bytes([0x1f, 0xff]);

/// A datagram in one piece.
pub const WHOLE: u8 = 0;
/// The first fragment of a datagram: it carries the ports.
pub const FIRST_FRAGMENT: u8 = 1;
/// A later fragment: no L4 header; the ports come from the fragment map.
pub const LATER_FRAGMENT: u8 = 2;

// Header layouts with naturally aligned fields, so that reads are single loads, not byte by
// byte. The IPv4 header starts 2 bytes past a 4-byte boundary of the frame and skb/XDP data
// starts 2 bytes past one too (NET_IP_ALIGN), so the fields are aligned in practice; where
// they are not, x86-64 and arm64 JITs load unaligned words correctly.
#[repr(C)]
struct EthHdr {
    _dst_src: [u16; 6],
    ether_type: u16,
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    _tos: u8,
    total_len: u16,
    id: u16,
    frag_off: u16,
    _ttl: u8,
    protocol: u8,
    _check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
struct Ports {
    source: u16,
    dest: u16,
}

/// Addresses and ports of one IPv4 TCP/UDP packet, all as on the wire (network byte order
/// held in native integers).
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// TCP flags (FIN, SYN, RST, ACK, ...); 0 for UDP and later fragments.
    pub tcp_flags: u8,
    /// [`WHOLE`], [`FIRST_FRAGMENT`] or [`LATER_FRAGMENT`] (ports 0 until looked up).
    pub fragment: u8,
    /// IP identification, as on the wire.
    pub ip_id: u16,
}

/// What the datapath looks at.
pub enum Packet {
    /// A TCP or UDP datagram or a fragment of one.
    L4(Flow),
    /// An ICMP message of `total_len` bytes (IPv4 header included) that may be an error about
    /// a flow: at least [`icmp::SHORT_LEN`] bytes, all in the frame.
    Icmp { total_len: usize },
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
fn header<T>(data: usize, data_end: usize, off: usize) -> Result<*const T, Verdict> {
    if data + off + core::mem::size_of::<T>() > data_end {
        return Err(Verdict::Pass(Counter::PassTruncated));
    }
    Ok((data + off) as *const T)
}

/// Parses the headers, which must lie in `data..data_end`; `packet_len` is the whole frame's
/// length, which for a TC skb can exceed the directly readable (linear) part.
#[inline(always)]
pub fn parse(data: usize, data_end: usize, packet_len: usize) -> Result<Packet, Verdict> {
    // SAFETY (all derefs below): header() checked each header lies inside data..data_end.
    let eth = header::<EthHdr>(data, data_end, 0)?;
    if unsafe { (*eth).ether_type } != ETH_P_IP_NET {
        return Err(Verdict::Pass(Counter::PassNotIpv4));
    }
    let ip = header::<Ipv4Hdr>(data, data_end, ETH_LEN)?;
    let version_ihl = unsafe { (*ip).version_ihl };
    if version_ihl >> 4 != 4 {
        return Err(Verdict::Pass(Counter::PassNotIpv4));
    }
    let ihl = version_ihl & 0x0f;
    if ihl < 5 {
        return Err(Verdict::Pass(Counter::PassTruncated));
    }
    if ihl > 5 {
        return Err(Verdict::Pass(Counter::PassIpOptions));
    }
    let protocol = unsafe { (*ip).protocol };
    let frag_off = unsafe { (*ip).frag_off };
    let total_len = u16::from_be(unsafe { (*ip).total_len }) as usize;
    if ETH_LEN + total_len > packet_len {
        return Err(Verdict::Pass(Counter::PassTruncated));
    }
    if protocol == icmp::PROTO_ICMP && frag_off & IP_FRAGMENT_MASK_NET == 0 {
        if total_len < icmp::SHORT_LEN {
            return Err(Verdict::Pass(Counter::PassNotTcpUdp));
        }
        return Ok(Packet::Icmp { total_len });
    }
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Err(Verdict::Pass(Counter::PassNotTcpUdp));
    }
    let fragment = if frag_off & IP_OFFSET_MASK_NET != 0 {
        LATER_FRAGMENT
    } else if frag_off & IP_FRAGMENT_MASK_NET != 0 {
        FIRST_FRAGMENT
    } else {
        WHOLE
    };
    let mut flow = Flow {
        saddr: unsafe { (*ip).saddr },
        daddr: unsafe { (*ip).daddr },
        sport: 0,
        dport: 0,
        protocol,
        tcp_flags: 0,
        fragment,
        ip_id: unsafe { (*ip).id },
    };
    if fragment == LATER_FRAGMENT {
        if total_len <= IPV4_LEN {
            return Err(Verdict::Pass(Counter::PassTruncated));
        }
        return Ok(Packet::L4(flow));
    }
    let l4_min = if protocol == PROTO_TCP { 20 } else { 8 };
    if total_len < IPV4_LEN + l4_min {
        return Err(Verdict::Pass(Counter::PassTruncated));
    }
    let ports = header::<Ports>(data, data_end, L4_OFF)?;
    flow.sport = unsafe { (*ports).source };
    flow.dport = unsafe { (*ports).dest };
    if protocol == PROTO_TCP {
        flow.tcp_flags = unsafe { *header::<u8>(data, data_end, L4_OFF + TCP_FLAGS_OFF)? };
    }
    Ok(Packet::L4(flow))
}
