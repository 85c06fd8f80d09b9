//! Datapath events through aya-log, for the agent's log: a dropped packet with its reason,
//! and (when tracing) the backend a new flow got. Sent only when the agent asked for them
//! (LB_EVENTS_V1); each is a subprogram of its own, so that the packet path carries one test
//! of the level and a call it does not make, not the logging code.
use aya_log_ebpf::{info, warn};
use lb_common::{PROTO_TCP, host_port, stats::Counter};

use crate::parse::Flow;

#[inline(always)]
fn protocol(p: u8) -> &'static str {
    if p == PROTO_TCP { "TCP" } else { "UDP" }
}

/// Why a packet was dropped, in the words of its counter.
#[inline(always)]
fn reason(counter: Counter) -> &'static str {
    match counter {
        Counter::DropRewriteFailed => "rewrite failed",
        Counter::DropNoBackend => "no backend in the slot",
        Counter::DropConntrackFull => "conntrack full",
        Counter::DropIcmpRateLimited => "no endpoints, ICMP reply over the rate",
        Counter::DropNoLocalEndpoint => "externalTrafficPolicy Local, no endpoint on this node",
        Counter::DropSnatExhausted => "no source port or address to send the flow to another node",
        Counter::DropNoRoute => "no route",
        Counter::DropSourceRange => "client outside loadBalancerSourceRanges",
        _ => "other",
    }
}

#[inline(never)]
pub fn dropped(flow: &Flow, counter: Counter) {
    let src = flow.saddr.to_ne_bytes();
    let dst = flow.daddr.to_ne_bytes();
    warn!(
        &(),
        "drop: {}: {} {:i}:{} -> {:i}:{}",
        reason(counter),
        protocol(flow.protocol),
        src,
        host_port(flow.sport),
        dst,
        host_port(flow.dport)
    );
}

/// A packet dropped before its flow was known (an ICMP error being translated).
#[inline(never)]
pub fn dropped_unparsed(counter: Counter) {
    warn!(&(), "drop: {}: ICMP error", reason(counter));
}

#[inline(never)]
pub fn new_flow(flow: &Flow, (addr, port): ([u8; 4], u16), service_id: u32) {
    let src = flow.saddr.to_ne_bytes();
    let dst = flow.daddr.to_ne_bytes();
    info!(
        &(),
        "new flow: {} {:i}:{} -> {:i}:{}: backend {:i}:{} (service id {})",
        protocol(flow.protocol),
        src,
        host_port(flow.sport),
        dst,
        host_port(flow.dport),
        addr,
        host_port(port),
        service_id
    );
}
