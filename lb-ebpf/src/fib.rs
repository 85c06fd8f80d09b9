//! FIB lookups: where the kernel would send a packet, for entry points that send packets out
//! themselves (TC with bpf_redirect, XDP with XDP_TX / XDP_REDIRECT).
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
};

const AF_INET: u8 = 2;

/// The next hop of a packet.
pub struct Route {
    /// The link it leaves by.
    pub ifindex: u32,
    /// The Ethernet header's 12 address bytes, the next hop's then the link's own, as in the
    /// header (in words); `None` when the neighbour is not resolved yet (TC can let the
    /// kernel resolve it with bpf_redirect_neigh).
    pub macs: Option<[u32; 3]>,
}

/// An IPv4 packet from `src` to `dst` (addresses and ports as on the wire) that arrived on
/// `ifindex`.
#[derive(Clone, Copy)]
pub struct Query {
    pub ifindex: u32,
    pub protocol: u8,
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
}

/// The route of the packet, as the kernel would forward it. `None`: no route, or the
/// destination is this node (nothing to forward).
/// A subprogram of its own: the lookup's 64-byte parameters would not fit in its callers'
/// frames beside their other subprograms'.
///
/// # Safety
/// `ctx` is the program's own context (skb or xdp_md).
#[inline(never)]
pub unsafe fn lookup(ctx: *mut core::ffi::c_void, query: &Query) -> Option<Route> {
    let Query {
        ifindex,
        protocol,
        src,
        dst,
    } = *query;
    // SAFETY: a plain C struct, all zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = protocol;
    params.sport = src.1;
    params.dport = dst.1;
    params.ifindex = ifindex;
    // tot_len stays 0: no MTU check here (the receiving link's stack does it).
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src.0);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst.0);
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: `params` is a valid, writable bpf_fib_lookup of `size` bytes.
    let result = unsafe { fib_lookup(ctx, &mut params, size, 0) } as u32;
    match result {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&params.dmac);
            macs[6..].copy_from_slice(&params.smac);
            Some(Route {
                ifindex: params.ifindex,
                // SAFETY: 12 bytes either way, any bit pattern valid.
                macs: Some(unsafe { core::mem::transmute::<[u8; 12], [u32; 3]>(macs) }),
            })
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Some(Route {
            ifindex: params.ifindex,
            macs: None,
        }),
        _ => None,
    }
}
