#![no_std]
#![no_main]

mod events;
mod fib;
mod maps;
mod parse;
mod pipeline;
mod sock;
mod tc;
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::stats::Counter;
use parse::{Packet, parse};

/// The result of a stage that ends the pipeline early.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// Let the packet through unchanged.
    Pass(Counter),
    /// Drop the packet.
    Drop(Counter),
}

/// TC ingress on pod links: Service DNAT for requests, ICMP errors from clients.
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    tc::run::<true, false>(&ctx)
}

/// TC egress on pod links: reverse NAT for replies, ICMP errors toward clients.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    tc::run::<false, false>(&ctx)
}

/// TC ingress on links to other nodes and the outside: Service DNAT (and SNAT toward other
/// nodes) for clients outside the cluster, their replies, ICMP errors.
#[classifier]
pub fn lb_tc_external(ctx: TcContext) -> i32 {
    tc::run::<true, true>(&ctx)
}

/// XDP on links to other nodes and the outside: what `lb_tc_external` does, before the
/// kernel builds an skb; what it cannot finish it leaves to that program.
#[xdp]
pub fn lb_xdp_external(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

/// connect() of sockets in `--cgroup`: a Service's address becomes a backend's.
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, Counter::SockConnect)
}

/// sendto()/sendmsg() of unconnected UDP sockets in `--cgroup`: per datagram, as connect4.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, Counter::SockSendmsg)
}

/// recvfrom()/recvmsg() of UDP sockets in `--cgroup`: a backend's reply shows the Service as
/// its source.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_service(&ctx)
}

/// getpeername() of sockets in `--cgroup`: the Service, not the backend, is the peer.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::to_service(&ctx)
}

/// Returns at once: the floor that benchmarks subtract from XDP programs.
#[xdp]
pub fn lb_xdp_floor(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Returns at once: the floor that benchmarks subtract.
#[classifier]
pub fn lb_tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

/// Parses the packet and looks its flow up in conntrack, nothing more: the reference that
/// benchmarks express every path's cost in, on whatever machine they run.
#[classifier]
pub fn lb_tc_reference(ctx: TcContext) -> i32 {
    if let Ok(Packet::L4(flow)) = parse(ctx.data(), ctx.data_end(), ctx.len() as usize)
        && maps::LB_CONNTRACK4_V4
            .get_ptr(pipeline::ct_key(&flow))
            .is_some()
    {
        return TC_ACT_OK as i32;
    }
    TC_ACT_UNSPEC as i32
}

/// Writes the kernel's tick counter (jiffies) into the first 8 bytes of the packet: run by the
/// agent with BPF_PROG_TEST_RUN to measure the tick and read the datapath's clock.
#[classifier]
pub fn lb_tc_clock(ctx: TcContext) -> i32 {
    let data = ctx.data();
    if data + 8 > ctx.data_end() {
        return TC_ACT_UNSPEC as i32;
    }
    // SAFETY: 8 bytes in bounds, checked above; a helper without arguments.
    unsafe { *(data as *mut u64) = aya_ebpf::helpers::bpf_jiffies64() };
    TC_ACT_OK as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
