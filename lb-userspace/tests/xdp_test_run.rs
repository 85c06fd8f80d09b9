//! The XDP program through BPF_PROG_TEST_RUN, as it runs on an external link: each test in a
//! network namespace of its own whose routes and neighbours its FIB lookups find. Packets
//! "arrive" on `uplink` (the link to other nodes and the outside: 198.18.3.0/24 and
//! 198.18.254.0/24 behind it, their MAC addresses known); this node's pods (198.18.2.0/24)
//! are behind `pods`.
mod support;

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
use support::{
    datapath::{Output, TestDatapath},
    packet::*,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 100);
const CLIENT_NEXT_HOP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
const OTHER_NODE_NEXT_HOP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const NODE_PORT: u16 = 30080;

fn local_pod(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, i), 8080)
}

fn remote_pod(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 3, i), 8080)
}

fn node_port(scope: Scope) -> Frontend {
    Frontend {
        ip: Ipv4Addr::UNSPECIFIED,
        port: NODE_PORT,
        protocol: Protocol::Tcp,
        scope,
    }
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// Runs `test` with the uplink's ifindex on a thread in a new network namespace laid out as
/// above.
fn in_test_netns(test: impl FnOnce(u32) + Send + 'static) {
    support::datapath::require_root();
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

fn datapath(frontends: &[(Frontend, Backends)]) -> TestDatapath {
    let mut t = TestDatapath::new();
    t.dp.set_node_addresses(&[NODE]).unwrap();
    t.program_backends(frontends);
    t
}

/// Runs the XDP program on `frame` as if it arrived on `ifindex`.
fn xdp(t: &mut TestDatapath, ifindex: u32, frame: &[u8]) -> Output {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
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

fn valid(frame: &[u8]) -> bool {
    ip_checksum_valid(frame) && l4_checksum_valid(frame)
}

fn macs(frame: &[u8]) -> ([u8; 6], [u8; 6]) {
    (
        frame[0..6].try_into().unwrap(),
        frame[6..12].try_into().unwrap(),
    )
}

#[test]
fn a_flow_to_another_nodes_pod_is_sent_back_out_from_this_nodes_address() {
    in_test_netns(|uplink| {
        let mut t = datapath(&[(
            node_port(Scope::Cluster),
            Backends::serving(vec![remote_pod(1)]),
        )]);
        let out = xdp(
            &mut t,
            uplink,
            &ipv4_frame(TCP, (CLIENT, 40000), (NODE, NODE_PORT), b"x"),
        );
        assert_eq!(out.action, XDP_TX, "back out of the link it came in on");
        assert_eq!(src(&out.frame), (NODE, 40000));
        assert_eq!(dst(&out.frame), (*remote_pod(1).ip(), 8080));
        assert_eq!(
            macs(&out.frame).0,
            OTHER_NODE_NEXT_HOP,
            "to the next hop's address"
        );
        assert!(valid(&out.frame));
        assert_eq!((t.counter("snat_new"), t.counter("fib_redirect")), (1, 1));

        // Established, then the reply: translated back and sent to the client.
        let ack = tcp_with_flags((CLIENT, 40000), (NODE, NODE_PORT), 0x10);
        let out = xdp(&mut t, uplink, &ack);
        assert_eq!((out.action, src(&out.frame)), (XDP_TX, (NODE, 40000)));
        let reply = tcp_with_flags((*remote_pod(1).ip(), 8080), (NODE, 40000), 0x12);
        let out = xdp(&mut t, uplink, &reply);
        assert_eq!(out.action, XDP_TX);
        assert_eq!(src(&out.frame), (NODE, NODE_PORT));
        assert_eq!(dst(&out.frame), (CLIENT, 40000));
        assert_eq!(macs(&out.frame).0, CLIENT_NEXT_HOP);
        assert!(valid(&out.frame));
        assert_eq!(t.counter("reverse_nat"), 1);
    });
}

#[test]
fn a_flow_to_a_local_pod_is_translated_and_handed_to_the_stack() {
    in_test_netns(|uplink| {
        let mut t = datapath(&[(
            node_port(Scope::Cluster),
            Backends::serving(vec![local_pod(1)]),
        )]);
        let out = xdp(
            &mut t,
            uplink,
            &ipv4_frame(TCP, (CLIENT, 40000), (NODE, NODE_PORT), b""),
        );
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(
            src(&out.frame),
            (CLIENT, 40000),
            "the client's address kept"
        );
        assert_eq!(dst(&out.frame), (*local_pod(1).ip(), 8080));
        assert!(valid(&out.frame));
        assert_eq!((t.counter("dnat_new"), t.counter("snat_new")), (1, 0));

        // UDP, its checksum kept valid.
        let udp = Frontend {
            protocol: Protocol::Udp,
            ..node_port(Scope::Cluster)
        };
        let mut t = datapath(&[(udp, Backends::serving(vec![local_pod(2)]))]);
        let frame = ipv4_frame(UDP, (CLIENT, 40000), (NODE, NODE_PORT), b"query");
        let out = xdp(&mut t, uplink, &frame);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(dst(&out.frame), (*local_pod(2).ip(), 8080));
        assert!(valid(&out.frame));
    });
}

#[test]
fn what_xdp_does_not_own_passes_untouched_and_uncounted() {
    in_test_netns(|uplink| {
        let mut t = datapath(&[
            (
                node_port(Scope::Cluster),
                Backends::serving(vec![remote_pod(1)]),
            ),
            (node_port(Scope::External), Backends::default()),
            (
                Frontend::cluster(Ipv4Addr::new(198, 19, 0, 10), 80, Protocol::Tcp),
                Backends::default(),
            ),
        ]);
        for frame in [
            ipv4_frame(TCP, (CLIENT, 40000), (NODE, 22), b"x"),
            ipv4_frame(TCP, (CLIENT, 40000), (*remote_pod(1).ip(), 8080), b"x"),
            // A Service without endpoints: the TC program answers it.
            ipv4_frame(
                TCP,
                (CLIENT, 40000),
                (Ipv4Addr::new(198, 19, 0, 10), 80),
                b"x",
            ),
            vec![0u8; 60],
        ] {
            let out = xdp(&mut t, uplink, &frame);
            assert_eq!(out.action, XDP_PASS);
            assert_eq!(out.frame, frame);
        }
        assert_eq!(
            t.counter("pass_no_service"),
            0,
            "the TC program counts them"
        );
        // The Local policy on a node without endpoints: dropped here.
        let frame = ipv4_frame(TCP, (CLIENT, 40001), (NODE, NODE_PORT), b"");
        assert_eq!(xdp(&mut t, uplink, &frame).action, XDP_DROP);
        assert_eq!(t.counter("drop_no_local_endpoint"), 1);
    });
}
