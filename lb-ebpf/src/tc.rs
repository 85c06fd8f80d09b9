//! Stages 5-6 for the TC entry point: rewrite with the kernel's checksum helpers (which handle
//! CHECKSUM_PARTIAL packets from local senders correctly) and emit.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{PROTO_UDP, checksum, stats::Counter};

use crate::{
    Verdict,
    maps::{config, count},
    parse::{ETH_LEN, Flow, IPV4_LEN, L4_OFF, MAX_HEADERS, bytes, parse},
    pipeline::{Translation, decide, may_answer_unreachable},
};

const IP_SRC_OFF: usize = ETH_LEN + 12;
const IP_DST_OFF: usize = ETH_LEN + 16;
const IP_CSUM_OFF: usize = ETH_LEN + 10;

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let len = ctx.len() as usize;
    // Headers outside the linear part of the skb cannot be read directly: pull them in.
    if ctx.data() + MAX_HEADERS > ctx.data_end() && len > ctx.data_end() - ctx.data() {
        let _ = ctx.pull_data(len.min(MAX_HEADERS) as u32);
    }
    let flow = match parse(ctx.data(), ctx.data_end(), len) {
        Ok(f) => f,
        Err(v) => return finish(v),
    };
    let result = match decide(&flow) {
        Ok(Translation::Dnat {
            addr,
            port,
            counter,
        }) => rewrite(
            ctx,
            &flow,
            IP_DST_OFF,
            L4_OFF + 2,
            flow.daddr.to_ne_bytes(),
            flow.dport,
            addr,
            port,
        )
        .map(|()| (TC_ACT_OK as i32, counter)),
        Ok(Translation::Snat { addr, port }) => rewrite(
            ctx,
            &flow,
            IP_SRC_OFF,
            L4_OFF,
            flow.saddr.to_ne_bytes(),
            flow.sport,
            addr,
            port,
        )
        .map(|()| (TC_ACT_OK as i32, Counter::ReverseNat)),
        Ok(Translation::Unreachable) if !may_answer_unreachable(&config()) => {
            Err(Verdict::Drop(Counter::DropIcmpRateLimited))
        }
        Ok(Translation::Unreachable) => {
            port_unreachable(ctx).map(|()| (TC_ACT_REDIRECT as i32, Counter::IcmpNoEndpoints))
        }
        Err(v) => Err(v),
    };
    match result {
        Ok((action, counter)) => {
            count(counter);
            action
        }
        Err(v) => finish(v),
    }
}

#[inline(always)]
fn finish(v: Verdict) -> i32 {
    match v {
        Verdict::Pass(c) => {
            count(c);
            TC_ACT_OK as i32
        }
        Verdict::Drop(c) => {
            count(c);
            TC_ACT_SHOT as i32
        }
    }
}

/// Replaces one address and its port, fixing the IPv4 and L4 checksums.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    addr_off: usize,
    port_off: usize,
    old_addr: [u8; 4],
    old_port: u16,
    new_addr: [u8; 4],
    new_port: u16,
) -> Result<(), Verdict> {
    let failed = |_| Verdict::Drop(Counter::DropRewriteFailed);
    // The L4 checksum goes through the helper: for a CHECKSUM_PARTIAL packet (sent by a local
    // socket, not yet checksummed) the field holds the pseudo-header sum and must change the
    // other way, and port changes must not touch it; only the kernel knows which case it is.
    // A UDP checksum of zero means "none": BPF_F_MARK_MANGLED_0 leaves it so.
    let mangled = if flow.protocol == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = flow.l4_csum_off();
    let from = u32::from_ne_bytes(old_addr) as u64;
    let to = u32::from_ne_bytes(new_addr) as u64;
    ctx.l4_csum_replace(csum_off, from, to, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
        .map_err(failed)?;
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
            .map_err(failed)?;
    }
    // The helpers may have moved the packet: bounds-check again before writing directly.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + L4_OFF + 4 > data_end {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    // SAFETY: every offset written below is < L4_OFF + 4, checked just above.
    // Word-sized writes (see the alignment note in parse.rs).
    unsafe {
        let ip_csum = (data + IP_CSUM_OFF) as *mut u16;
        *ip_csum = checksum::replace4(u16::from_be(*ip_csum), old_addr, new_addr).to_be();
        *((data + addr_off) as *mut u32) = u32::from_ne_bytes(new_addr);
        *((data + port_off) as *mut u16) = new_port;
    }
    Ok(())
}

const ICMP_LEN: usize = 8;
/// RFC 792: the offending datagram's IP header plus its first 8 data bytes.
const QUOTE_LEN: usize = IPV4_LEN + 8;
const UNREACHABLE_LEN: usize = ETH_LEN + IPV4_LEN + ICMP_LEN + QUOTE_LEN;

/// Turns the packet into an ICMP port unreachable from the service address back to the client
/// and sends it out of the interface it came in on.
#[inline(always)]
fn port_unreachable(ctx: &TcContext) -> Result<(), Verdict> {
    let failed = |_| Verdict::Drop(Counter::DropRewriteFailed);
    // parse() already checked these bytes are there.
    let eth: [u8; ETH_LEN] = bytes(ctx.data(), ctx.data_end(), 0)?;
    let quote: [u8; QUOTE_LEN] = bytes(ctx.data(), ctx.data_end(), ETH_LEN)?;

    let mut out = [0u8; UNREACHABLE_LEN];
    // Ethernet: back to the sender.
    out[0..6].copy_from_slice(&eth[6..12]);
    out[6..12].copy_from_slice(&eth[0..6]);
    out[12] = 0x08;
    out[13] = 0x00;
    // IPv4 header: from the service address to the client.
    let ip = ETH_LEN;
    out[ip] = 0x45;
    out[ip + 1] = 0xc0; // precedence "internetwork control", as the kernel's own ICMP errors
    let total = (IPV4_LEN + ICMP_LEN + QUOTE_LEN) as u16;
    out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    out[ip + 8] = 64;
    out[ip + 9] = 1;
    out[ip + 12..ip + 16].copy_from_slice(&quote[16..20]);
    out[ip + 16..ip + 20].copy_from_slice(&quote[12..16]);
    let ip_csum = checksum::finish(checksum::add_bytes(0, &out[ip..ip + IPV4_LEN]));
    out[ip + 10..ip + 12].copy_from_slice(&ip_csum.to_be_bytes());
    // ICMP destination unreachable (3), port unreachable (3), then the quote.
    let icmp = ip + IPV4_LEN;
    out[icmp] = 3;
    out[icmp + 1] = 3;
    out[icmp + ICMP_LEN..].copy_from_slice(&quote);
    let icmp_csum = checksum::finish(checksum::add_bytes(0, &out[icmp..]));
    out[icmp + 2..icmp + 4].copy_from_slice(&icmp_csum.to_be_bytes());

    // SAFETY: plain helper calls on this program's own skb.
    let skb = ctx.skb.skb;
    if unsafe { bpf_skb_change_tail(skb, UNREACHABLE_LEN as u32, 0) } != 0 {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    ctx.store(0, &out, 0).map_err(failed)?;
    let ifindex = unsafe { (*skb).ifindex };
    if unsafe { bpf_redirect(ifindex, 0) } != TC_ACT_REDIRECT as i64 {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    Ok(())
}
