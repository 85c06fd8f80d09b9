//! The XDP program through BPF_PROG_TEST_RUN, as it runs on an external link: each test in a
//! network namespace of its own whose routes and neighbours its FIB lookups find (see
//! `support::uplink`).
mod support;

use std::net::Ipv4Addr;

use lb::{
    desired::{Backends, Frontend, Scope},
    model::Protocol,
};
use support::{
    packet::*,
    uplink::{
        CLIENT, CLIENT_NEXT_HOP, NODE, NODE_PORT, OTHER_NODE_NEXT_HOP, datapath, in_test_netns,
        local_pod, node_port, remote_pod, xdp,
    },
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

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

#[test]
fn established_packets_go_to_the_next_hop_their_entry_keeps_until_it_is_written_again() {
    in_test_netns(|uplink| {
        let mut t = datapath(&[(
            node_port(Scope::Cluster),
            Backends::serving(vec![remote_pod(1)]),
        )]);
        let client = (CLIENT, 40000);
        xdp(
            &mut t,
            uplink,
            &tcp_with_flags(client, (NODE, NODE_PORT), 0x02),
        );
        let ack = tcp_with_flags(client, (NODE, NODE_PORT), 0x10);
        assert_eq!(
            macs(&xdp(&mut t, uplink, &ack).frame).0,
            OTHER_NODE_NEXT_HOP
        );
        let entries = t.dp.conntrack_entries().unwrap();
        let (_, forward) = entries
            .iter()
            .find(|(k, _)| k.src == CLIENT.octets())
            .expect("the flow's entry");
        assert_ne!(forward.flags & lb_common::CT_ROUTE, 0, "{forward:?}");
        assert_eq!(forward.route_ifindex, uplink);
        let route_macs: [u8; 12] = bytemuck::cast(forward.route_macs);
        assert_eq!(route_macs[..6], OTHER_NODE_NEXT_HOP);

        // The next hop's MAC address changes: packets that write nothing keep the one held
        // (no FIB lookup) ...
        let new_mac = [0x02, 0, 0, 0, 0, 0x33];
        let status = std::process::Command::new("ip")
            .args([
                "neigh",
                "replace",
                &remote_pod(1).ip().to_string(),
                "lladdr",
                "02:00:00:00:00:33",
                "dev",
                "uplink",
                "nud",
                "permanent",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            macs(&xdp(&mut t, uplink, &ack).frame).0,
            OTHER_NODE_NEXT_HOP
        );
        // ... until one writes the entry (here a state change; at least once a second while
        // packets flow): it looks the next hop up again.
        let fin = tcp_with_flags(client, (NODE, NODE_PORT), 0x11);
        let out = xdp(&mut t, uplink, &fin);
        assert_eq!((out.action, macs(&out.frame).0), (XDP_TX, new_mac));
        assert_eq!(macs(&xdp(&mut t, uplink, &ack).frame).0, new_mac);
    });
}
