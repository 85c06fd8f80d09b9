//! Stages 5-6 for the TC entry point: rewrite with the kernel's checksum helpers (which handle
//! CHECKSUM_PARTIAL packets from local senders correctly) and emit.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{
        bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use lb_common::{
    EVENTS_DROPS, EVENTS_FLOWS, PROTO_UDP, checksum,
    icmp::{self, End, Headers, PROTO_ICMP},
    stats::Counter,
};

use crate::{
    Verdict, events, fib,
    maps::{config, count, count_traffic, events_level},
    parse::{
        ETH_LEN, FIRST_FRAGMENT, Flow, IPV4_LEN, L4_OFF, LATER_FRAGMENT, MAX_HEADERS, Packet, parse,
    },
    pipeline::{
        Action, Endpoint, Translation, decide_egress, decide_ingress, fragment_ports,
        icmp_error_target, may_answer_unreachable, next_hop, remember_fragment, track_external,
    },
};

const IP_SRC_OFF: usize = ETH_LEN + 12;
const IP_CSUM_OFF: usize = ETH_LEN + 10;

/// FIB lookups on the skb.
struct SkbRouting<'a>(&'a TcContext);

impl SkbRouting<'_> {
    /// The link the packet arrived on (at ingress) or leaves by (at egress).
    fn ifindex(&self) -> u32 {
        // SAFETY: reads a field of this program's own skb.
        unsafe { (*self.0.skb.skb).ifindex }
    }

    fn route(&self, protocol: u8, src: Endpoint, dst: Endpoint) -> Option<fib::Route> {
        let query = fib::Query {
            ifindex: self.ifindex(),
            protocol,
            src,
            dst,
        };
        // SAFETY: the program's own skb.
        unsafe { fib::lookup(self.0.skb.skb as *mut _, &query) }
    }

    /// Whether a packet from the flow's source to `dst` leaves by the link it came in on:
    /// `dst` is on another node, behind the link the client came from.
    #[inline(always)]
    fn leaves_where_it_came(&self, flow: &Flow, dst: [u8; 4]) -> bool {
        let src = (flow.saddr.to_ne_bytes(), flow.sport);
        self.route(flow.protocol, src, (dst, flow.dport))
            .is_some_and(|r| r.ifindex == self.ifindex())
    }
}

/// `INGRESS`: packets entering the node (from pods, or with `EXTERNAL` from other nodes and
/// the outside), the forward direction. Otherwise packets leaving toward a pod, the reply
/// direction.
#[inline(always)]
pub fn run<const INGRESS: bool, const EXTERNAL: bool>(ctx: &TcContext) -> i32 {
    let len = ctx.len() as usize;
    // Headers outside the linear part of the skb cannot be read directly: pull them in.
    if ctx.data() + MAX_HEADERS > ctx.data_end() && len > ctx.data_end() - ctx.data() {
        let _ = ctx.pull_data(len.min(MAX_HEADERS) as u32);
    }
    let mut flow = match parse(ctx.data(), ctx.data_end(), len) {
        Ok(Packet::L4(f)) => f,
        Ok(Packet::Icmp { total_len }) => {
            let sent = icmp_error(ctx, total_len, INGRESS).and_then(|routed| match routed {
                Some((src, dst)) => redirect(ctx, SkbRouting(ctx).route(PROTO_ICMP, src, dst)),
                None => Ok(TC_ACT_OK as i32),
            });
            return finish(sent.map(|a| (a, Counter::IcmpErrorTranslated)), None);
        }
        Err(v) => return finish(Err(v), None),
    };
    if flow.fragment == LATER_FRAGMENT
        && let Err(v) = fragment_ports(&mut flow)
    {
        return finish(Err(v), Some(&flow));
    }
    let decision = if INGRESS {
        match decide_ingress::<EXTERNAL, false>(&flow) {
            Ok(chosen) if EXTERNAL && chosen.action == Action::NewExternal => {
                let remote = SkbRouting(ctx).leaves_where_it_came(&flow, chosen.dst.0);
                track_external(&flow, &chosen, remote)
            }
            decided => decided,
        }
    } else {
        decide_egress(&flow)
    };
    // Here, not where the flow is decided: that frame and the event's would not fit together.
    if let Some((to, service_id)) = decision.as_ref().ok().and_then(Translation::new_flow)
        && events_level() >= EVENTS_FLOWS
    {
        events::new_flow(&flow, to, service_id);
    }
    emit(ctx, &flow, &decision)
}

/// Carries out the decision on the packet, counts it, and returns the program's verdict.
/// A subprogram of its own: with the deciding one, and with those it calls, its frame shares
/// the 512-byte stack.
#[inline(never)]
fn emit(ctx: &TcContext, flow: &Flow, decision: &Result<Translation, Verdict>) -> i32 {
    let len = ctx.len() as u64;
    let result = match decision {
        // No ICMP error about a later fragment (it quotes no ports), as the kernel sends none.
        Ok(t) if t.action == Action::Unreachable && flow.fragment == LATER_FRAGMENT => {
            Err(Verdict::Pass(Counter::PassFragment))
        }
        Ok(t) if t.action == Action::Unreachable && !may_answer_unreachable(&config()) => {
            Err(Verdict::Drop(Counter::DropIcmpRateLimited))
        }
        Ok(t) if t.action == Action::Unreachable => {
            port_unreachable(ctx).map(|()| (TC_ACT_REDIRECT as i32, Counter::IcmpNoEndpoints))
        }
        Ok(t) => rewrite(ctx, flow, t.src, t.dst)
            .and_then(|()| match t.action {
                Action::Hairpin => hairpin(ctx),
                Action::Routed => route_out(ctx, flow, t),
                _ => Ok(TC_ACT_OK as i32),
            })
            .map(|action| (action, t.counter)),
        Err(v) => Err(*v),
    };
    if let (Ok(t), Ok(_)) = (decision, &result)
        && let Some((service_id, inbound)) = t.traffic()
    {
        count_traffic(service_id, inbound, len);
        if flow.fragment == FIRST_FRAGMENT {
            remember_fragment(flow);
        }
    }
    finish(result, Some(flow))
}

/// Counts the verdict and acts on it; a drop is also an event when the agent asked for them.
#[inline(always)]
fn finish(result: Result<(i32, Counter), Verdict>, flow: Option<&Flow>) -> i32 {
    match result {
        Ok((action, counter)) => {
            count(counter);
            action
        }
        Err(Verdict::Pass(c)) => {
            count(c);
            TC_ACT_OK as i32
        }
        Err(Verdict::Drop(c)) => {
            count(c);
            if events_level() >= EVENTS_DROPS {
                match flow {
                    Some(flow) => events::dropped(flow, c),
                    None => events::dropped_unparsed(c),
                }
            }
            TC_ACT_SHOT as i32
        }
    }
}

/// Gives the packet a new source and destination, fixing the IPv4 and L4 checksums. A later
/// fragment has no L4 header: its datagram's checksum was fixed in the first fragment.
/// A subprogram of its own, shared by every translation: its frame is not the caller's.
#[inline(never)]
fn rewrite(ctx: &TcContext, flow: &Flow, src: Endpoint, dst: Endpoint) -> Result<(), Verdict> {
    let failed = |_| Verdict::Drop(Counter::DropRewriteFailed);
    let old_src = flow.saddr.to_ne_bytes();
    let old_dst = flow.daddr.to_ne_bytes();
    let whole_l4 = flow.fragment != LATER_FRAGMENT;
    if whole_l4 {
        // The L4 checksum goes through the helper: for a CHECKSUM_PARTIAL packet (sent by a
        // local socket, not yet checksummed) the field holds the pseudo-header sum and must
        // change the other way, and port changes must not touch it; only the kernel knows
        // which case it is. A UDP checksum of zero means "none": BPF_F_MARK_MANGLED_0 leaves
        // it so.
        let mangled = if flow.protocol == PROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        let csum_off = flow.l4_csum_off();
        let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
        if old_src != src.0 {
            let (from, to) = (u32::from_ne_bytes(old_src), u32::from_ne_bytes(src.0));
            ctx.l4_csum_replace(csum_off, from as u64, to as u64, pseudo)
                .map_err(failed)?;
        }
        if old_dst != dst.0 {
            let (from, to) = (u32::from_ne_bytes(old_dst), u32::from_ne_bytes(dst.0));
            ctx.l4_csum_replace(csum_off, from as u64, to as u64, pseudo)
                .map_err(failed)?;
        }
        if flow.sport != src.1 {
            ctx.l4_csum_replace(csum_off, flow.sport as u64, src.1 as u64, mangled | 2)
                .map_err(failed)?;
        }
        if flow.dport != dst.1 {
            ctx.l4_csum_replace(csum_off, flow.dport as u64, dst.1 as u64, mangled | 2)
                .map_err(failed)?;
        }
    }
    // The helpers may have moved the packet: bounds-check again before writing directly.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + L4_OFF > data_end {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    // SAFETY: every offset written below is < L4_OFF, checked just above. Word-sized writes
    // (see the alignment note in parse.rs).
    unsafe {
        let ip_csum = (data + IP_CSUM_OFF) as *mut u16;
        let mut c = u16::from_be(*ip_csum);
        c = checksum::replace4(c, old_src, src.0);
        c = checksum::replace4(c, old_dst, dst.0);
        *ip_csum = c.to_be();
        let addrs = (data + IP_SRC_OFF) as *mut u32;
        *addrs = u32::from_ne_bytes(src.0);
        *addrs.add(1) = u32::from_ne_bytes(dst.0);
    }
    if whole_l4 {
        if data + L4_OFF + 4 > data_end {
            return Err(Verdict::Drop(Counter::DropRewriteFailed));
        }
        // SAFETY: bounds checked just above.
        unsafe {
            let ports = (data + L4_OFF) as *mut u16;
            *ports = src.1;
            *ports.add(1) = dst.1;
        }
    }
    Ok(())
}

/// Sends a rewritten hairpin packet back out of the link it came in on, to the pod that sent
/// it. Routing it instead would fail: the kernel drops a packet whose source is the Service
/// address on a pod's link (no route back) or the pod's own (martian).
#[inline(always)]
fn hairpin(ctx: &TcContext) -> Result<i32, Verdict> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + ETH_LEN > data_end {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    // SAFETY: the Ethernet header is in bounds (checked above); u16 halves of the addresses.
    unsafe {
        let mac = data as *mut [u16; 6];
        let m = *mac;
        *mac = [m[3], m[4], m[5], m[0], m[1], m[2]];
    }
    count(Counter::Hairpin);
    // SAFETY: a plain helper call on this program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    Ok(action as i32)
}

/// Sends a rewritten packet (now `t.src` to `t.dst`) straight out to its next hop (see
/// [`next_hop`]): its source is one of this node's addresses, which the kernel drops as
/// martian on a forwarded packet.
#[inline(always)]
fn route_out(ctx: &TcContext, flow: &Flow, t: &Translation) -> Result<i32, Verdict> {
    let lookup = || SkbRouting(ctx).route(flow.protocol, t.src, t.dst);
    redirect(ctx, next_hop(flow, t, lookup))
}

/// Sends the packet out by `route` (none: dropped).
#[inline(always)]
fn redirect(ctx: &TcContext, route: Option<fib::Route>) -> Result<i32, Verdict> {
    let Some(route) = route else {
        return Err(Verdict::Drop(Counter::DropNoRoute));
    };
    let action = match route.macs {
        Some(macs) => {
            let (data, data_end) = (ctx.data(), ctx.data_end());
            if data + ETH_LEN > data_end {
                return Err(Verdict::Drop(Counter::DropRewriteFailed));
            }
            // SAFETY: the Ethernet header is in bounds, checked above.
            unsafe { core::ptr::write_unaligned(data as *mut [u32; 3], macs) };
            // SAFETY: a plain helper call.
            unsafe { bpf_redirect(route.ifindex, 0) }
        }
        // The kernel resolves the next hop's address and fills in the header.
        // SAFETY: a plain helper call; no next hop given (the FIB's is used).
        None => unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) },
    };
    if action != TC_ACT_REDIRECT as i64 {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    count(Counter::FibRedirect);
    Ok(action as i32)
}

/// An ICMP error about a translated flow: the quoted datagram and the outer header get the
/// addresses the receiver knows (see [`icmp_error_target`]), every checksum fixed. Returns
/// the new outer source and destination where the program must send it out itself.
/// A function of its own (a BPF subprogram with its own stack frame): inlined, its copy of the
/// headers and the port-unreachable reply's would not fit in one 512-byte frame together.
#[inline(never)]
fn icmp_error(
    ctx: &TcContext,
    total_len: usize,
    ingress: bool,
) -> Result<Option<(Endpoint, Endpoint)>, Verdict> {
    let mut headers: Headers = [0; icmp::LONG_LEN];
    let skb = ctx.skb.skb;
    let to = headers.as_mut_ptr() as *mut core::ffi::c_void;
    // parse() checked that total_len bytes are in the frame. The helper also reads outside
    // the linear part; a constant length per branch, as the verifier wants.
    let long = total_len >= icmp::LONG_LEN;
    // SAFETY: `to` has room for LONG_LEN bytes.
    let loaded = unsafe {
        if long {
            bpf_skb_load_bytes(skb as *const _, ETH_LEN as u32, to, icmp::LONG_LEN as u32)
        } else {
            bpf_skb_load_bytes(skb as *const _, ETH_LEN as u32, to, icmp::SHORT_LEN as u32)
        }
    };
    if loaded != 0 {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    let Some(quoted) = icmp::quoted(&headers) else {
        return Err(Verdict::Pass(Counter::PassNotTcpUdp));
    };
    let Some(target) = icmp_error_target(&quoted, ingress) else {
        return Err(Verdict::Pass(Counter::PassIcmpError));
    };
    let len = if long {
        icmp::LONG_LEN
    } else {
        icmp::SHORT_LEN
    };
    if let Some((addr, port)) = target.source {
        icmp::translate(&mut headers, len, End::Source, addr, port);
    }
    if let Some((addr, port)) = target.destination {
        icmp::translate(&mut headers, len, End::Destination, addr, port);
    }
    let from = headers.as_ptr() as *const core::ffi::c_void;
    // SAFETY: `from` points at `len` initialised bytes of the stack copy.
    let stored = unsafe {
        if long {
            bpf_skb_store_bytes(skb, ETH_LEN as u32, from, icmp::LONG_LEN as u32, 0)
        } else {
            bpf_skb_store_bytes(skb, ETH_LEN as u32, from, icmp::SHORT_LEN as u32, 0)
        }
    };
    if stored != 0 {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    if !target.routed {
        return Ok(None);
    }
    let (src, dst) = icmp::outer_addresses(&headers);
    Ok(Some(((src, 0), (dst, 0))))
}

const ICMP_LEN: usize = 8;
/// RFC 792: the offending datagram's IP header plus its first 8 data bytes.
const QUOTE_LEN: usize = IPV4_LEN + 8;
const UNREACHABLE_LEN: usize = ETH_LEN + IPV4_LEN + ICMP_LEN + QUOTE_LEN;

/// Turns the packet into an ICMP port unreachable from the service address back to the client
/// and sends it out of the interface it came in on. A subprogram of its own, as icmp_error().
#[inline(never)]
fn port_unreachable(ctx: &TcContext) -> Result<(), Verdict> {
    let failed = |_| Verdict::Drop(Counter::DropRewriteFailed);
    // parse() already checked these bytes are there.
    // SAFETY: plain helper calls on this program's own skb. Changing the tail keeps the
    // first bytes, and parse() checked the frame holds the headers quoted below.
    let skb = ctx.skb.skb;
    if unsafe { bpf_skb_change_tail(skb, UNREACHABLE_LEN as u32, 0) } != 0 {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    if ctx.data() + UNREACHABLE_LEN > ctx.data_end() {
        ctx.pull_data(UNREACHABLE_LEN as u32).map_err(failed)?;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + UNREACHABLE_LEN > data_end {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    // Built in place, the quote moved first (a copy on the stack would not fit beside the
    // caller's frame).
    // SAFETY: the whole reply lies in the packet, checked just above.
    let out = unsafe { &mut *(data as *mut [u8; UNREACHABLE_LEN]) };
    let quote = ETH_LEN + IPV4_LEN + ICMP_LEN;
    let mut i = 0;
    while i < QUOTE_LEN {
        out[quote + i] = out[ETH_LEN + i];
        i += 1;
    }
    // Ethernet: back to the sender.
    let mut i = 0;
    while i < 6 {
        let dst = out[i];
        out[i] = out[6 + i];
        out[6 + i] = dst;
        i += 1;
    }
    // IPv4 header: from the service address to the client.
    let ip = ETH_LEN;
    out[ip] = 0x45;
    out[ip + 1] = 0xc0; // precedence "internetwork control", as the kernel's own ICMP errors
    let total = ((IPV4_LEN + ICMP_LEN + QUOTE_LEN) as u16).to_be_bytes();
    out[ip + 2] = total[0];
    out[ip + 3] = total[1];
    let mut i = 4;
    while i < IPV4_LEN {
        out[ip + i] = 0;
        i += 1;
    }
    out[ip + 8] = 64;
    out[ip + 9] = 1;
    let mut i = 0;
    while i < 4 {
        out[ip + 12 + i] = out[quote + 16 + i];
        out[ip + 16 + i] = out[quote + 12 + i];
        i += 1;
    }
    let ip_csum = checksum::finish(checksum::add_bytes(0, &out[ip..ip + IPV4_LEN])).to_be_bytes();
    out[ip + 10] = ip_csum[0];
    out[ip + 11] = ip_csum[1];
    // ICMP destination unreachable (3), port unreachable (3), then the quote.
    let icmp = ip + IPV4_LEN;
    out[icmp] = 3;
    out[icmp + 1] = 3;
    let mut i = 2;
    while i < ICMP_LEN {
        out[icmp + i] = 0;
        i += 1;
    }
    let icmp_csum = checksum::finish(checksum::add_bytes(0, &out[icmp..])).to_be_bytes();
    out[icmp + 2] = icmp_csum[0];
    out[icmp + 3] = icmp_csum[1];

    let ifindex = unsafe { (*skb).ifindex };
    if unsafe { bpf_redirect(ifindex, 0) } != TC_ACT_REDIRECT as i64 {
        return Err(Verdict::Drop(Counter::DropRewriteFailed));
    }
    Ok(())
}
