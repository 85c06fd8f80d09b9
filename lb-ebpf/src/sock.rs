//! Connect-time load balancing: cgroup sock_addr programs that send a socket to a Service's
//! backend when it connects (or, unconnected UDP, per datagram), so its packets carry the
//! backend's address and need no translation on their way; and that show the socket the
//! Service's address where the kernel would show the backend's (getpeername, recvfrom).
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    CtKey, FRONTEND_SOURCE_RANGES, PROTO_TCP, PROTO_UDP, SockRevKey, SockService, stats::Counter,
};

use crate::{
    Verdict,
    maps::{LB_SOCK_REVNAT4_V1, config, count},
    pipeline::{Client, choose, first4, now, service_frontend},
};

/// The call goes on, to the address the program leaves in the context.
const PROCEED: i32 = 1;
/// The call fails, with the error the program set (bpf_set_retval, Linux 5.18), else EPERM.
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// connect4 and sendmsg4: a socket calling a Service's address and port gets a backend's in
/// their place, picked as the packet path picks one (the client being the socket's network
/// namespace); a Service without endpoints refuses the call. `translated` counts the socket.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext, translated: Counter) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the program's context, valid for this run; fields read whole (4 bytes), as
    // the verifier requires of these.
    let (protocol, addr, port) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let protocol = match protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return PROCEED,
    };
    let addr = addr.to_ne_bytes();
    // The port in network byte order, in the low 16 bits.
    let port = port as u16;
    let Some((frontend, _)) = service_frontend::<false>(addr, port, protocol) else {
        return PROCEED;
    };
    // Whether the client may call it depends on its source address, which a socket does not
    // have yet: the packet path decides.
    if frontend.flags & FRONTEND_SOURCE_RANGES != 0 {
        return PROCEED;
    }
    if frontend.backend_count == 0 {
        count(Counter::SockNoEndpoints);
        // SAFETY: a helper taking an integer.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    }
    // SAFETY (both cookies): helpers taking the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // What a Maglev table is indexed by: the source port is not chosen yet, so a random one
    // (the spread of flows over the table is the packet path's).
    // SAFETY: a helper without arguments.
    let sport = unsafe { bpf_get_prandom_u32() } as u16;
    let key = CtKey {
        src: (netns as u32).to_ne_bytes(),
        dst: addr,
        sport,
        dport: port,
        protocol,
        _pad1: 0,
        _pad2: 0,
    };
    let config = config();
    let (backend_id, backend) = match choose(Client::Netns(netns), &key, &frontend, now(&config)) {
        Ok(chosen) => chosen,
        // A table being replaced: the packet path tries again.
        Err(Verdict::Pass(counter) | Verdict::Drop(counter)) => {
            count(counter);
            return PROCEED;
        }
    };
    let backend_addr = first4(&backend.addr);
    let rev_key = SockRevKey {
        cookie,
        backend_addr,
        backend_port: backend.port,
        _pad: 0,
    };
    let service = SockService {
        addr,
        port,
        _pad: 0,
        service_id: frontend.service_id,
        backend_id,
    };
    // Written only when new: unconnected UDP sockets send many datagrams to one backend.
    // SAFETY: compared at once.
    let known = unsafe { LB_SOCK_REVNAT4_V1.get(&rev_key) }.is_some_and(|s| *s == service);
    if !known {
        // LRU: an insert evicts rather than fails; without it only the peer address the
        // socket is shown would be the backend's.
        let _ = LB_SOCK_REVNAT4_V1.insert(&rev_key, &service, 0);
    }
    // SAFETY: the program's context; these two fields are writable at this hook.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(backend_addr);
        (*sa).user_port = u32::from(backend.port);
    }
    count(translated);
    PROCEED
}

/// recvmsg4 and getpeername4: a backend's address, as the socket reached it in place of a
/// Service, is shown as the Service's.
#[inline(always)]
pub fn to_service(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the program's context, valid for this run.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = SockRevKey {
        // SAFETY: a helper taking the program's context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend_addr: addr.to_ne_bytes(),
        backend_port: port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(service) = unsafe { LB_SOCK_REVNAT4_V1.get(&key) } {
        let (addr, port) = (service.addr, service.port);
        // SAFETY: the program's context; these two fields are writable at this hook.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(addr);
            (*sa).user_port = u32::from(port);
        }
        count(Counter::SockReverseNat);
    }
    PROCEED
}
