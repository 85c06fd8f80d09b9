#![no_std]
#![no_main]

mod maps;
mod parse;
mod pipeline;
mod tc;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use lb_common::stats::Counter;

/// The result of a stage that ends the pipeline early.
pub enum Verdict {
    /// Let the packet through unchanged.
    Pass(Counter),
    /// Drop the packet.
    Drop(Counter),
}

/// TC ingress on pod links and uplinks: Service DNAT for requests, ICMP errors from clients.
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    tc::run::<true>(&ctx)
}

/// TC egress on pod links: reverse NAT for replies, ICMP errors toward clients.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    tc::run::<false>(&ctx)
}

/// Returns at once: the floor that benchmarks subtract.
#[classifier]
pub fn lb_tc_floor(_ctx: TcContext) -> i32 {
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
