//! The external TC program (links to other nodes and the outside) through BPF_PROG_TEST_RUN:
//! nodePorts, SNAT toward other nodes' endpoints, routed replies, the Local policy and source
//! ranges. Each test runs in a network namespace of its own, whose routes are what the
//! program's FIB lookups find: 198.18.2.0/24 (this node's pods) behind a pod link, other
//! nodes' pods (198.18.3.0/24) and the outside (198.18.254.0/24) behind the link every test
//! packet arrives on (loopback).
mod support;

use std::{net::Ipv4Addr, process::Command};

use lb::{
    dataplane::TC_EXTERNAL_PROGRAM,
    desired::{Backends, Frontend, Scope},
    model::Protocol,
};
use support::{
    datapath::{Output, TestDatapath},
    packet::*,
    uplink::{CLIENT, NODE, NODE_PORT, datapath, local_pod, node_port, remote_pod},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 7);

/// Runs `test` on a thread in a new network namespace with the routes above.
fn in_test_netns(test: impl FnOnce() + Send + 'static) {
    support::datapath::require_root();
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which nothing else shares.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        for line in [
            "ip link set lo up",
            "ip link add pods type veth peer name pods-peer",
            "ip link set pods up",
            "ip link set pods-peer up",
            "ip route add 198.18.2.0/24 dev pods",
            "ip route add 198.18.3.0/24 dev lo",
            "ip route add 198.18.254.0/24 dev lo",
            "sysctl -qw net.ipv4.ip_forward=1",
        ] {
            let args: Vec<&str> = line.split(' ').collect();
            let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
            assert!(status.success(), "{line}");
        }
        test();
    })
    .join()
    .expect("test in its namespace");
}

fn external(t: &mut TestDatapath, frame: &[u8]) -> Output {
    t.run_program(TC_EXTERNAL_PROGRAM, frame)
}

fn valid(frame: &[u8]) -> bool {
    ip_checksum_valid(frame) && l4_checksum_valid(frame)
}

#[test]
fn a_node_port_flow_to_a_local_pod_keeps_the_client_and_its_reply_is_routed_back() {
    in_test_netns(|| {
        let mut t = datapath(&[(
            node_port(Scope::Cluster),
            Backends::serving(vec![local_pod(1)]),
        )]);
        let out = external(
            &mut t,
            &ipv4_frame(TCP, (CLIENT, 40000), (NODE, NODE_PORT), b"hi"),
        );
        assert_eq!(
            out.action, TC_ACT_OK,
            "handed to the stack, which routes it to the pod"
        );
        assert_eq!(
            src(&out.frame),
            (CLIENT, 40000),
            "the client's address kept"
        );
        assert_eq!(dst(&out.frame), (*local_pod(1).ip(), 8080));
        assert!(valid(&out.frame));
        assert_eq!(t.counter("snat_new"), 0);

        // The pod's reply, where it enters the node (its link's ingress program).
        let reply = ipv4_frame(TCP, (*local_pod(1).ip(), 8080), (CLIENT, 40000), b"ok");
        let out = t.run(&reply);
        assert_eq!(out.action, TC_ACT_REDIRECT, "sent out by FIB lookup");
        assert_eq!(
            src(&out.frame),
            (NODE, NODE_PORT),
            "from the address the client called"
        );
        assert_eq!(dst(&out.frame), (CLIENT, 40000));
        assert!(valid(&out.frame));
        assert_eq!(t.counter("fib_redirect"), 1);
    });
}

#[test]
fn a_flow_to_another_nodes_pod_leaves_from_this_nodes_address_and_comes_back() {
    in_test_netns(|| {
        let mut t = datapath(&[(
            node_port(Scope::Cluster),
            Backends::serving(vec![remote_pod(1)]),
        )]);
        let syn = ipv4_frame(TCP, (CLIENT, 40000), (NODE, NODE_PORT), b"");
        let out = external(&mut t, &syn);
        assert_eq!(out.action, TC_ACT_REDIRECT);
        assert_eq!(
            src(&out.frame),
            (NODE, 40000),
            "SNAT keeps the client's port if free"
        );
        assert_eq!(dst(&out.frame), (*remote_pod(1).ip(), 8080));
        assert!(valid(&out.frame));
        assert_eq!((t.counter("snat_new"), t.counter("dnat_new")), (1, 1));

        // Established: the same translation.
        let ack = tcp_with_flags((CLIENT, 40000), (NODE, NODE_PORT), 0x10);
        let out = external(&mut t, &ack);
        assert_eq!(
            (src(&out.frame), dst(&out.frame)),
            ((NODE, 40000), (*remote_pod(1).ip(), 8080))
        );
        assert_eq!(t.counter("dnat_established"), 1);

        // The reply arrives on the same link, to this node's address.
        let reply = tcp_with_flags((*remote_pod(1).ip(), 8080), (NODE, 40000), 0x12);
        let out = external(&mut t, &reply);
        assert_eq!(out.action, TC_ACT_REDIRECT);
        assert_eq!(src(&out.frame), (NODE, NODE_PORT));
        assert_eq!(dst(&out.frame), (CLIENT, 40000), "back to the client");
        assert!(valid(&out.frame));
        assert_eq!(t.counter("reverse_nat"), 1);

        // Another client on the same port: the source port is taken, another is chosen.
        let other = Ipv4Addr::new(198, 18, 254, 101);
        let out = external(
            &mut t,
            &ipv4_frame(TCP, (other, 40000), (NODE, NODE_PORT), b""),
        );
        let (addr, port) = src(&out.frame);
        assert_eq!(addr, NODE);
        assert_ne!(port, 40000);
        assert!(port >= 1024);
        let reply = tcp_with_flags((*remote_pod(1).ip(), 8080), (NODE, port), 0x12);
        assert_eq!(dst(&external(&mut t, &reply).frame), (other, 40000));
    });
}

#[test]
fn the_local_policy_drops_where_this_node_has_no_endpoint() {
    in_test_netns(|| {
        let mut t = datapath(&[
            (
                node_port(Scope::Cluster),
                Backends::serving(vec![remote_pod(1)]),
            ),
            (node_port(Scope::External), Backends::default()),
        ]);
        let frame = ipv4_frame(TCP, (CLIENT, 40000), (NODE, NODE_PORT), b"");
        let out = external(&mut t, &frame);
        assert_eq!(out.action, TC_ACT_SHOT);
        assert_eq!(t.counter("drop_no_local_endpoint"), 1);
        // A pod calling the node's address gets the cluster entry: every endpoint.
        let pod = Ipv4Addr::new(198, 18, 2, 9);
        let out = t.run(&ipv4_frame(TCP, (pod, 40000), (NODE, NODE_PORT), b""));
        assert_eq!(out.action, TC_ACT_OK);
        assert_eq!(dst(&out.frame), (*remote_pod(1).ip(), 8080));
        assert_eq!(src(&out.frame), (pod, 40000), "pods are not source-NATed");
    });
}

#[test]
fn source_ranges_drop_other_clients_of_a_load_balancer_address() {
    in_test_netns(|| {
        let balancer = Frontend::cluster(LB_IP, 80, Protocol::Tcp);
        let mut t = datapath(&[(
            balancer,
            Backends {
                source_ranges: vec!["198.18.254.96/28".parse().unwrap()],
                ..Backends::serving(vec![local_pod(1)])
            },
        )]);
        let allowed = external(&mut t, &ipv4_frame(TCP, (CLIENT, 40000), (LB_IP, 80), b""));
        assert_eq!(allowed.action, TC_ACT_OK);
        assert_eq!(dst(&allowed.frame), (*local_pod(1).ip(), 8080));
        let outsider = Ipv4Addr::new(198, 18, 254, 20);
        let frame = ipv4_frame(TCP, (outsider, 40000), (LB_IP, 80), b"");
        assert_eq!(external(&mut t, &frame).action, TC_ACT_SHOT);
        assert_eq!(t.counter("drop_source_range"), 1);
    });
}

#[test]
fn packets_for_no_frontend_pass_byte_identical() {
    in_test_netns(|| {
        let mut t = datapath(&[(
            node_port(Scope::Cluster),
            Backends::serving(vec![local_pod(1)]),
        )]);
        for frame in [
            // To the node, another port (ssh, the kubelet, ...).
            ipv4_frame(TCP, (CLIENT, 40000), (NODE, 22), b"x"),
            ipv4_frame(UDP, (CLIENT, 40000), (NODE, NODE_PORT + 1), b"x"),
            // The nodePort, but at an address that is not the node's.
            ipv4_frame(
                TCP,
                (CLIENT, 40000),
                (Ipv4Addr::new(198, 18, 254, 2), NODE_PORT),
                b"x",
            ),
            // Forwarded through the node.
            ipv4_frame(TCP, (CLIENT, 40000), (*remote_pod(1).ip(), 8080), b"x"),
        ] {
            let out = external(&mut t, &frame);
            assert_eq!(out.action, TC_ACT_OK);
            assert_eq!(out.frame, frame);
        }
        assert_eq!(t.counter("pass_no_service"), 4);
    });
}

/// An ICMP error frame's outer source and destination, its quoted datagram's source and
/// destination (address, port), and whether its outer IPv4, ICMP and quoted IPv4 checksums
/// are all valid.
#[allow(clippy::type_complexity)]
fn icmp_parts(f: &[u8]) -> ([Ipv4Addr; 2], [(Ipv4Addr, u16); 2], bool) {
    let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    let port = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    let sum = lb_common::checksum::checksum;
    let valid = sum(&f[14..34]) == 0 && sum(&f[34..]) == 0 && sum(&f[42..62]) == 0;
    (
        [ip(26), ip(30)],
        [(ip(54), port(62)), (ip(58), port(64))],
        valid,
    )
}

#[test]
fn icmp_errors_about_a_flow_sent_on_to_another_node_reach_each_end_as_it_knows_the_flow() {
    in_test_netns(|| {
        let mut t = datapath(&[(
            node_port(Scope::Cluster),
            Backends::serving(vec![remote_pod(1)]),
        )]);
        let client = (CLIENT, 40000);
        let backend = (*remote_pod(1).ip(), 8080);
        let sent = external(&mut t, &tcp_with_flags(client, (NODE, NODE_PORT), 0x02));
        assert_eq!(
            src(&sent.frame),
            (NODE, 40000),
            "source-NATed to the client's port"
        );

        // The backend (or a router on its way) about what it got: to the client, about the
        // datagram it sent, from the address it called.
        let error = icmp_error_frame(backend.0, NODE, 3, 4, &sent.frame, 28);
        let out = external(&mut t, &error);
        assert_eq!(out.action, TC_ACT_REDIRECT, "sent out by the program");
        assert_eq!(
            icmp_parts(&out.frame),
            ([NODE, CLIENT], [client, (NODE, NODE_PORT)], true)
        );

        // A router on the client's way about a reply (path MTU): to the backend, about the
        // reply as the backend sent it (to this node's address and port).
        let router = Ipv4Addr::new(198, 18, 254, 254);
        let reply_seen = tcp_with_flags((NODE, NODE_PORT), client, 0x12);
        let error = icmp_error_frame(router, NODE, 3, 4, &reply_seen, 28);
        let out = external(&mut t, &error);
        assert_eq!(out.action, TC_ACT_REDIRECT);
        assert_eq!(
            icmp_parts(&out.frame),
            ([router, backend.0], [backend, (NODE, 40000)], true)
        );
        assert_eq!(t.counter("icmp_error_translated"), 2);
    });
}

#[test]
fn icmp_errors_about_a_flow_to_a_local_pod_reach_each_end_as_it_knows_the_flow() {
    in_test_netns(|| {
        let mut t = datapath(&[(
            node_port(Scope::Cluster),
            Backends::serving(vec![local_pod(1)]),
        )]);
        let client = (CLIENT, 40000);
        let backend = (*local_pod(1).ip(), 8080);
        let sent = external(&mut t, &tcp_with_flags(client, (NODE, NODE_PORT), 0x02));
        assert_eq!(dst(&sent.frame), backend);
        // The pod (here: fragmentation needed) through its link (the pod programs' ingress):
        // to the client, from the address the client called.
        let error = icmp_error_frame(backend.0, CLIENT, 3, 4, &sent.frame, 28);
        let out = t.run(&error);
        assert_eq!(out.action, TC_ACT_REDIRECT, "from a node address: sent out");
        assert_eq!(
            icmp_parts(&out.frame),
            ([NODE, CLIENT], [client, (NODE, NODE_PORT)], true)
        );
        // The client about a reply: to the pod, handed to the stack.
        let reply_seen = tcp_with_flags((NODE, NODE_PORT), client, 0x12);
        let error = icmp_error_frame(CLIENT, NODE, 3, 4, &reply_seen, 28);
        let out = external(&mut t, &error);
        assert_eq!(out.action, TC_ACT_OK);
        assert_eq!(
            icmp_parts(&out.frame),
            ([CLIENT, backend.0], [backend, client], true)
        );
    });
}
