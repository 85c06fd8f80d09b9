//! A node's links in a network namespace of its own, for BPF_PROG_TEST_RUN of programs that
//! look up the FIB: packets "arrive" on `uplink` (the link to other nodes and the outside:
//! 198.18.3.0/24 and 198.18.254.0/24 behind it, their MAC addresses known); this node's pods
//! (198.18.2.0/24) are behind `pods`.
#![allow(dead_code)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use aya::programs::{TestRun, TestRunOptions};
use lb::{
    dataplane::XDP_PROGRAM,
    desired::{Backends, Frontend, Scope},
    model::Protocol,
};

use super::datapath::{Output, TestDatapath};

pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 100);
pub const CLIENT_NEXT_HOP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
pub const OTHER_NODE_NEXT_HOP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];

pub const NODE_PORT: u16 = 30080;

/// A pod of this node (behind `pods`).
pub fn local_pod(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, i), 8080)
}

/// A pod of another node (behind `uplink`).
pub fn remote_pod(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 3, i), 8080)
}

/// TCP [`NODE_PORT`] on every node address, in `scope`.
pub fn node_port(scope: Scope) -> Frontend {
    Frontend {
        ip: Ipv4Addr::UNSPECIFIED,
        port: NODE_PORT,
        protocol: Protocol::Tcp,
        scope,
    }
}

/// A datapath with [`NODE`] as the node's address and these frontends.
pub fn datapath(frontends: &[(Frontend, Backends)]) -> TestDatapath {
    let mut t = TestDatapath::new();
    t.dp.set_node_addresses(&[NODE]).unwrap();
    t.program_backends(frontends);
    t
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// Runs `test` with the uplink's ifindex on a thread in a new network namespace laid out as
/// above.
pub fn in_test_netns(test: impl FnOnce(u32) + Send + 'static) {
    super::datapath::require_root();
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which nothing else shares.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        let client_mac = mac(CLIENT_NEXT_HOP);
        let other_mac = mac(OTHER_NODE_NEXT_HOP);
        for line in [
            "ip link set lo up".to_string(),
            "ip link add uplink type veth peer name uplink-peer".into(),
            "ip link add pods type veth peer name pods-peer".into(),
            "ip link set uplink up".into(),
            "ip link set uplink-peer up".into(),
            "ip link set pods up".into(),
            "ip link set pods-peer up".into(),
            format!("ip addr add {NODE}/24 dev uplink"),
            "ip route add 198.18.2.0/24 dev pods".into(),
            "ip route add 198.18.3.0/24 dev uplink".into(),
            format!("ip neigh add {CLIENT} lladdr {client_mac} dev uplink nud permanent"),
            format!("ip neigh add 198.18.254.101 lladdr {client_mac} dev uplink nud permanent"),
            format!("ip neigh add 198.18.3.1 lladdr {other_mac} dev uplink nud permanent"),
            "sysctl -qw net.ipv4.ip_forward=1".into(),
        ] {
            let args: Vec<&str> = line.split(' ').collect();
            let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
            assert!(status.success(), "{line}");
        }
        // Asked of the kernel (/sys shows the namespace it was mounted in).
        let name = std::ffi::CString::new("uplink").unwrap();
        // SAFETY: a plain C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0);
        test(ifindex);
    })
    .join()
    .expect("test in its namespace");
}

/// The XDP context of a frame that arrived on `ifindex` (struct xdp_md: data, data_end,
/// data_meta, ingress_ifindex, rx_queue_index, egress_ifindex).
pub fn xdp_md(frame: &[u8], ifindex: u32) -> Vec<u8> {
    [0, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// Runs the XDP program on `frame` as if it arrived on `ifindex`.
pub fn xdp(t: &mut TestDatapath, ifindex: u32, frame: &[u8]) -> Output {
    let ctx = xdp_md(frame, ifindex);
    let mut out = vec![0u8; frame.len() + 256];
    let program = t.dp.xdp_program(XDP_PROGRAM).unwrap();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    Output {
        action: result.return_value,
        frame: out,
    }
}
