//! Stages 5-6 for the XDP entry point on external links: the same decisions as the TC external
//! program (shared stages in `pipeline`), carried out before the kernel builds an skb. What
//! XDP cannot finish it passes on unchanged, and the TC program behind it does the work: ICMP,
//! replies of no flow, Services without endpoints, next hops whose address is not resolved
//! yet. Passed packets are not counted here (the TC program counts them).
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_redirect,
    programs::XdpContext,
};
use lb_common::{EVENTS_DROPS, EVENTS_FLOWS, PROTO_UDP, checksum, stats::Counter};

use crate::{
    Verdict, events, fib,
    maps::{count, count_traffic, events_level},
    parse::{ETH_LEN, FIRST_FRAGMENT, Flow, L4_OFF, LATER_FRAGMENT, Packet, parse},
    pipeline::{
        Action, Endpoint, Translation, decide_ingress, fragment_ports, next_hop, remember_fragment,
        track_external,
    },
};

const IP_CSUM_OFF: usize = ETH_LEN + 10;
const IP_SRC_OFF: usize = ETH_LEN + 12;

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let mut flow = match parse(data, data_end, data_end - data) {
        Ok(Packet::L4(f)) => f,
        // ICMP errors and whatever else: the TC program's.
        _ => return XDP_PASS,
    };
    if flow.fragment == LATER_FRAGMENT && fragment_ports(&mut flow).is_err() {
        return XDP_PASS;
    }
    let decision = match decide_ingress::<true, true>(&flow) {
        Ok(chosen) if chosen.action == Action::NewExternal => {
            let remote = route(
                ctx,
                &flow,
                (flow.saddr.to_ne_bytes(), flow.sport),
                chosen.dst,
            )
            .is_some_and(|r| r.ifindex == ctx.ingress_ifindex() as u32);
            track_external(&flow, &chosen, remote)
        }
        decided => decided,
    };
    if let Some((to, service_id)) = decision.as_ref().ok().and_then(Translation::new_flow)
        && events_level() >= EVENTS_FLOWS
    {
        events::new_flow(&flow, to, service_id);
    }
    emit(ctx, &flow, &decision)
}

fn route(ctx: &XdpContext, flow: &Flow, src: Endpoint, dst: Endpoint) -> Option<fib::Route> {
    let query = fib::Query {
        ifindex: ctx.ingress_ifindex() as u32,
        protocol: flow.protocol,
        src,
        dst,
    };
    // SAFETY: the program's own context.
    unsafe { fib::lookup(ctx.ctx as *mut _, &query) }
}

/// Carries out the decision and returns the program's verdict.
/// A subprogram of its own, as the TC program's emit.
#[inline(never)]
fn emit(ctx: &XdpContext, flow: &Flow, decision: &Result<Translation, Verdict>) -> u32 {
    let t = match decision {
        Ok(t) => t,
        Err(Verdict::Pass(_)) => return XDP_PASS,
        Err(Verdict::Drop(c)) => return drop(flow, *c),
    };
    let action = match t.action {
        Action::Rewrite => XDP_PASS,
        Action::Routed => match next_hop(flow, t, || route(ctx, flow, t.src, t.dst)) {
            None => return drop(flow, Counter::DropNoRoute),
            // The kernel resolves the next hop: the TC program sends it (the flow is tracked,
            // it finds the entry).
            Some(fib::Route { macs: None, .. }) => {
                count(Counter::XdpToTc);
                return XDP_PASS;
            }
            Some(fib::Route {
                ifindex,
                macs: Some(macs),
            }) => {
                if rewrite(ctx, flow, t.src, t.dst).is_err() || set_macs(ctx, macs).is_err() {
                    return drop(flow, Counter::DropRewriteFailed);
                }
                count(Counter::FibRedirect);
                if ifindex == ctx.ingress_ifindex() as u32 {
                    XDP_TX
                } else {
                    // SAFETY: a plain helper call.
                    unsafe { bpf_redirect(ifindex, 0) as u32 }
                }
            }
        },
        // A hairpin, a Service without endpoints (ICMP reply), a flow not recorded: the TC
        // program's.
        _ => {
            count(Counter::XdpToTc);
            return XDP_PASS;
        }
    };
    if t.action == Action::Rewrite && rewrite(ctx, flow, t.src, t.dst).is_err() {
        return drop(flow, Counter::DropRewriteFailed);
    }
    count(t.counter);
    if let Some((service_id, inbound)) = t.traffic() {
        count_traffic(service_id, inbound, (ctx.data_end() - ctx.data()) as u64);
    }
    if flow.fragment == FIRST_FRAGMENT {
        remember_fragment(flow);
    }
    action
}

fn drop(flow: &Flow, counter: Counter) -> u32 {
    count(counter);
    if events_level() >= EVENTS_DROPS {
        events::dropped(flow, counter);
    }
    XDP_DROP
}

/// Gives the packet a new source and destination, updating the IPv4 and L4 checksums
/// incrementally. Right for packets with full checksums (what a NIC delivers); XDP cannot
/// tell a locally sent CHECKSUM_PARTIAL one (see the veth note in the README's tests).
#[inline(always)]
fn rewrite(ctx: &XdpContext, flow: &Flow, src: Endpoint, dst: Endpoint) -> Result<(), ()> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + L4_OFF > data_end {
        return Err(());
    }
    let (old_src, old_dst) = (flow.saddr.to_ne_bytes(), flow.daddr.to_ne_bytes());
    // SAFETY: every offset written is < L4_OFF, checked above; word-sized, aligned fields.
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
    if flow.fragment == LATER_FRAGMENT {
        return Ok(());
    }
    let csum_off = flow.l4_csum_off();
    if data + csum_off + 2 > data_end || data + L4_OFF + 4 > data_end {
        return Err(());
    }
    // SAFETY: bounds checked just above.
    unsafe {
        let field = (data + csum_off) as *mut u16;
        let old = u16::from_be(*field);
        // A UDP checksum of zero means "none": it stays so.
        if !(flow.protocol == PROTO_UDP && old == 0) {
            let mut c = checksum::replace4(old, old_src, src.0);
            c = checksum::replace4(c, old_dst, dst.0);
            c = checksum::replace2(c, flow.sport.to_ne_bytes(), src.1.to_ne_bytes());
            c = checksum::replace2(c, flow.dport.to_ne_bytes(), dst.1.to_ne_bytes());
            if flow.protocol == PROTO_UDP && c == 0 {
                c = 0xffff;
            }
            *field = c.to_be();
        }
        let ports = (data + L4_OFF) as *mut u16;
        *ports = src.1;
        *ports.add(1) = dst.1;
    }
    Ok(())
}

/// Writes the Ethernet header's addresses (the next hop's, then the link's own).
#[inline(always)]
fn set_macs(ctx: &XdpContext, macs: [u32; 3]) -> Result<(), ()> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + ETH_LEN > data_end {
        return Err(());
    }
    // SAFETY: the Ethernet header is in bounds, checked above; unaligned word stores are
    // fine on the architectures with a BPF JIT that runs XDP (see the README's kernel table).
    unsafe { core::ptr::write_unaligned(data as *mut [u32; 3], macs) };
    Ok(())
}
