//! Packet behaviour of the TC program, table by table, through BPF_PROG_TEST_RUN.
mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use lb::{
    diff::frontend_key,
    events::{CapturedEvents, EventsLevel},
};
use lb_common::ServiceTraffic;
use support::{
    datapath::{TestDatapath, tcp_frontend, udp_frontend},
    packet::*,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

fn backend(i: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, i), port)
}

fn with_web_service(backends: Vec<SocketAddrV4>) -> TestDatapath {
    let mut t = TestDatapath::new();
    t.program(&[(tcp_frontend(VIP, 80), backends)]);
    t
}

#[test]
fn new_flow_is_dnated_with_valid_checksums() {
    let mut t = with_web_service(vec![backend(1, 8080)]);
    let frame = ipv4_frame(TCP, (CLIENT, 40000), (VIP, 80), b"GET / HTTP/1.0\r\n\r\n");
    let out = t.run(&frame);
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(dst(&out.frame), (*backend(1, 8080).ip(), 8080));
    assert_eq!(src(&out.frame), (CLIENT, 40000));
    assert!(ip_checksum_valid(&out.frame), "IPv4 checksum");
    assert!(l4_checksum_valid(&out.frame), "TCP checksum");
    assert_eq!(
        out.frame[..24],
        frame[..24],
        "only addresses, ports and checksums change"
    );
    assert_eq!(out.frame[54..], frame[54..], "payload untouched");
    assert_eq!(t.counter("dnat_new"), 1);
}

#[test]
fn established_flow_keeps_its_backend_and_reply_is_reverse_translated() {
    let backends: Vec<_> = (1..=8).map(|i| backend(i, 8080)).collect();
    let mut t = with_web_service(backends.clone());
    let frame = ipv4_frame(TCP, (CLIENT, 40001), (VIP, 80), b"x");
    let first = dst(&t.run(&frame).frame);
    for _ in 0..20 {
        assert_eq!(dst(&t.run(&frame).frame), first, "same flow, same backend");
    }
    assert_eq!(t.counter("dnat_established"), 20);

    let reply = ipv4_frame(TCP, first, (CLIENT, 40001), b"HTTP/1.0 200 OK\r\n");
    // Where it enters the node the reply passes as it is: the node routes it and checks it
    // against the client link's MTU with the backend's address, then it is translated on its
    // way out to the client.
    let entering = t.run(&reply);
    assert_eq!((entering.action, &entering.frame), (TC_ACT_OK, &reply));
    assert_eq!(t.counter("pass_reply"), 1);
    let out = t.run_egress(&reply);
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(src(&out.frame), (VIP, 80), "client sees the ClusterIP");
    assert_eq!(dst(&out.frame), (CLIENT, 40001));
    assert!(ip_checksum_valid(&out.frame) && l4_checksum_valid(&out.frame));
    assert_eq!(t.counter("reverse_nat"), 1);
}

#[test]
fn new_flows_spread_over_every_backend() {
    let backends: Vec<_> = (1..=4).map(|i| backend(i, 8080)).collect();
    let mut t = with_web_service(backends.clone());
    let mut seen = std::collections::BTreeMap::new();
    for port in 0..400u16 {
        let out = t.run(&ipv4_frame(TCP, (CLIENT, 20000 + port), (VIP, 80), b""));
        *seen.entry(dst(&out.frame).0).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    // Uniform random: each of 4 gets 100 on average; 40 is > 6 standard deviations away.
    assert!(seen.values().all(|n| *n > 40), "{seen:?}");
}

#[test]
fn removed_backend_gets_no_flow_and_its_flows_move() {
    let mut t = with_web_service(vec![backend(1, 8080), backend(2, 8080)]);
    // Find a flow that went to backend 1.
    let (frame, _) = (30000..30100u16)
        .map(|p| {
            let f = ipv4_frame(TCP, (CLIENT, p), (VIP, 80), b"");
            let d = dst(&t.run(&f).frame);
            (f, d)
        })
        .find(|(_, d)| d.0 == *backend(1, 8080).ip())
        .expect("some flow picks backend 1");
    t.program(&[(tcp_frontend(VIP, 80), vec![backend(2, 8080)])]);
    assert_eq!(dst(&t.run(&frame).frame).0, *backend(2, 8080).ip());
    for p in 31000..31050u16 {
        let out = t.run(&ipv4_frame(TCP, (CLIENT, p), (VIP, 80), b""));
        assert_eq!(dst(&out.frame).0, *backend(2, 8080).ip());
    }
}

#[test]
fn udp_and_tcp_on_the_same_port_are_different_frontends() {
    let mut t = TestDatapath::new();
    t.program(&[
        (tcp_frontend(VIP, 53), vec![backend(1, 5353)]),
        (udp_frontend(VIP, 53), vec![backend(2, 5354)]),
    ]);
    let tcp = t.run(&ipv4_frame(TCP, (CLIENT, 5000), (VIP, 53), b"q"));
    assert_eq!(dst(&tcp.frame), (*backend(1, 5353).ip(), 5353));
    let udp = t.run(&ipv4_frame(UDP, (CLIENT, 5000), (VIP, 53), b"query"));
    assert_eq!(dst(&udp.frame), (*backend(2, 5354).ip(), 5354));
    assert!(
        ip_checksum_valid(&udp.frame) && l4_checksum_valid(&udp.frame),
        "UDP checksum"
    );

    // A UDP datagram without checksum (0) keeps having none.
    let mut frame = ipv4_frame(UDP, (CLIENT, 5001), (VIP, 53), b"query");
    frame[40] = 0;
    frame[41] = 0;
    let out = t.run(&frame);
    assert_eq!(dst(&out.frame).1, 5354);
    assert_eq!(&out.frame[40..42], &[0, 0]);
    assert!(ip_checksum_valid(&out.frame));

    let reply = t.run_egress(&ipv4_frame(
        UDP,
        (*backend(2, 5354).ip(), 5354),
        (CLIENT, 5000),
        b"answer",
    ));
    assert_eq!(src(&reply.frame), (VIP, 53));
    assert!(l4_checksum_valid(&reply.frame));
}

#[test]
fn non_service_and_malformed_frames_pass_byte_identical() {
    let mut t = with_web_service(vec![backend(1, 8080)]);
    let good = ipv4_frame(TCP, (CLIENT, 40000), (VIP, 80), b"payload");
    // Frames cut inside the IPv4 header are refused by BPF_PROG_TEST_RUN itself (it pulls an
    // IPv4 header for an IPv4 ethertype); parse() bounds-checks them the same way as these.
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "other address",
            ipv4_frame(TCP, (CLIENT, 1), (Ipv4Addr::new(198, 18, 9, 9), 80), b""),
            "pass_no_service",
        ),
        (
            "other port",
            ipv4_frame(TCP, (CLIENT, 1), (VIP, 81), b""),
            "pass_no_service",
        ),
        (
            "UDP to a TCP-only port",
            ipv4_frame(UDP, (CLIENT, 1), (VIP, 80), b""),
            "pass_no_service",
        ),
        ("TCP header cut", good[..44].to_vec(), "pass_truncated"),
    ];
    let mut long_total = good.clone();
    long_total[16..18].copy_from_slice(&1500u16.to_be_bytes());
    cases.push(("total length beyond frame", long_total, "pass_truncated"));
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44;
    cases.push(("IHL below 5", short_ihl, "pass_truncated"));
    let mut options = good.clone();
    options[14] = 0x46;
    options.splice(34..34, [1, 1, 1, 0]);
    options[17] += 4;
    cases.push(("IP options", options, "pass_ip_options"));
    let mut later_fragment = good.clone();
    later_fragment[20] = 0x00;
    later_fragment[21] = 0x10;
    cases.push((
        "later fragment of no known datagram",
        later_fragment,
        "pass_fragment",
    ));
    let mut vlan = good[..12].to_vec();
    vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    vlan.extend_from_slice(&good[12..]);
    cases.push(("VLAN tag", vlan, "pass_not_ipv4"));
    let mut ipv6 = good[..12].to_vec();
    ipv6.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, 17, 64]);
    ipv6.extend_from_slice(&[0u8; 40]);
    cases.push(("IPv6", ipv6, "pass_not_ipv4"));
    let mut icmp = good.clone();
    icmp[23] = 1;
    cases.push(("ICMP to the service address", icmp, "pass_not_tcp_udp"));
    let mut version = good.clone();
    version[14] = 0x65;
    cases.push((
        "IP version 6 in an IPv4 ethertype",
        version,
        "pass_not_ipv4",
    ));

    for (name, frame, counter) in cases {
        let before = t.counter(counter);
        let out = t.run(&frame);
        assert_eq!(out.action, TC_ACT_OK, "{name}");
        assert_eq!(out.frame, frame, "{name}: must pass byte-identical");
        assert_eq!(
            t.counter(counter),
            before + 1,
            "{name}: counted as {counter}"
        );
    }
    assert_eq!(t.counter("dnat_new"), 0);
}

#[test]
fn service_without_endpoints_answers_icmp_port_unreachable() {
    let mut t = with_web_service(vec![]);
    let frame = ipv4_frame(TCP, (CLIENT, 40000), (VIP, 80), b"GET /");
    let out = t.run(&frame);
    assert_eq!(
        out.action, TC_ACT_REDIRECT,
        "sent back out of the interface"
    );
    let f = &out.frame;
    assert_eq!(f.len(), 14 + 20 + 8 + 28);
    assert_eq!(&f[0..6], &CLIENT_MAC, "back to the sender");
    assert_eq!(&f[6..12], &NODE_MAC);
    assert_eq!(&f[12..14], &[0x08, 0x00]);
    assert_eq!(f[14], 0x45);
    assert_eq!(
        u16::from_be_bytes([f[16], f[17]]) as usize,
        f.len() - 14,
        "IPv4 total length"
    );
    assert_eq!(f[23], 1, "ICMP");
    assert_eq!(&f[26..30], &VIP.octets(), "from the service address");
    assert_eq!(&f[30..34], &CLIENT.octets(), "to the client");
    assert!(ip_checksum_valid(f));
    assert_eq!(
        (f[34], f[35]),
        (3, 3),
        "destination unreachable / port unreachable"
    );
    assert_eq!(lb_common::checksum::checksum(&f[34..]), 0, "ICMP checksum");
    assert_eq!(
        &f[42..70],
        &frame[14..42],
        "quotes the IP header and 8 bytes of TCP"
    );
    assert_eq!(t.counter("icmp_no_endpoints"), 1);

    let udp = t.run(&ipv4_frame(UDP, (CLIENT, 40000), (VIP, 80), b"q"));
    assert_eq!(
        udp.action, TC_ACT_OK,
        "the service has no UDP port 80: passes"
    );
}

#[test]
fn full_conntrack_evicts_old_flows_and_new_flows_keep_working() {
    let backends = vec![backend(1, 8080), backend(2, 8080)];
    let mut t = with_web_service(backends.clone());
    // Every flow takes two entries (forward and reply): this is twice what the map holds.
    let flows = lb_common::MAX_CONNTRACK;
    let frame = |i: u32| {
        let client = Ipv4Addr::new(198, 18, 100 + (i / 50_000) as u8, 1);
        ipv4_frame(TCP, (client, 10_000 + (i % 50_000) as u16), (VIP, 80), b"")
    };
    for i in 0..flows {
        let out = t.run(&frame(i));
        assert_eq!(out.action, TC_ACT_OK, "flow {i}");
        let d = dst(&out.frame);
        assert!(
            backends.iter().any(|b| (*b.ip(), b.port()) == d),
            "flow {i} went to {d:?}"
        );
    }
    assert_eq!(
        t.counter("dnat_new"),
        flows as u64,
        "every new flow translated, none dropped"
    );
    assert_eq!(t.counter("drop_conntrack_full"), 0);
    assert!(t.dp.conntrack_len().unwrap() <= lb_common::MAX_CONNTRACK as usize);
    // The most recent flows are still tracked.
    let before = t.counter("dnat_established");
    for i in flows - 1000..flows {
        t.run(&frame(i));
    }
    assert_eq!(t.counter("dnat_established") - before, 1000);
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

#[test]
fn draining_backend_keeps_established_flows_and_takes_no_new_one() {
    use lb::desired::Backends;
    let mut t = TestDatapath::new();
    let both = vec![backend(1, 8080), backend(2, 8080)];
    t.program(&[(tcp_frontend(VIP, 80), both.clone())]);
    // Flows on both backends.
    let mut on = std::collections::BTreeMap::new();
    for port in 30000..30040u16 {
        let out = t.run(&tcp_with_flags((CLIENT, port), (VIP, 80), SYN));
        on.insert(port, dst(&out.frame));
    }
    assert!(on.values().any(|d| d.0 == *both[1].ip()));
    // backend 2 turns not ready / terminating: it drains.
    t.program_backends(&[(
        tcp_frontend(VIP, 80),
        Backends {
            serving: vec![both[0]],
            draining: vec![both[1]],
            ..Backends::default()
        },
    )]);
    for (port, was) in &on {
        let out = t.run(&tcp_with_flags((CLIENT, *port), (VIP, 80), ACK));
        assert_eq!(dst(&out.frame), *was, "established flows stay put");
    }
    for port in 31000..31050u16 {
        let out = t.run(&tcp_with_flags((CLIENT, port), (VIP, 80), SYN));
        assert_eq!(dst(&out.frame), (*both[0].ip(), 8080), "no new flow drains");
    }
    // Removed altogether: its flows move at the next packet.
    t.program(&[(tcp_frontend(VIP, 80), vec![both[0]])]);
    for port in on.keys() {
        let out = t.run(&tcp_with_flags((CLIENT, *port), (VIP, 80), ACK));
        assert_eq!(dst(&out.frame), (*both[0].ip(), 8080));
    }
}

#[test]
fn tcp_states_and_timeouts_decide_what_a_flow_keeps() {
    use lb_common::conntrack::{CLOSING, SEEN_NON_SYN};
    let backends: Vec<_> = (1..=8).map(|i| backend(i, 8080)).collect();
    let mut t = with_web_service(backends);
    let state_of = |t: &TestDatapath, port: u16| {
        t.dp.conntrack_entries()
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.src == CLIENT.octets() && k.sport == port.to_be())
            .map(|(_, e)| e.state)
            .next()
    };
    let syn = tcp_with_flags((CLIENT, 40100), (VIP, 80), SYN);
    let first = dst(&t.run(&syn).frame);
    assert_eq!(state_of(&t, 40100), Some(0), "handshake");
    t.run(&tcp_with_flags((CLIENT, 40100), (VIP, 80), ACK));
    assert_eq!(state_of(&t, 40100), Some(SEEN_NON_SYN), "established");
    // The backend's FIN closes both directions.
    let out = t.run_egress(&tcp_with_flags(first, (CLIENT, 40100), FIN | ACK));
    assert_eq!(src(&out.frame), (VIP, 80));
    assert_eq!(state_of(&t, 40100), Some(SEEN_NON_SYN | CLOSING));
    let entries = t.dp.conntrack_entries().unwrap();
    assert!(
        entries.iter().all(|(_, e)| e.state & CLOSING != 0),
        "{entries:?}"
    );
    // A new SYN on the closed 4-tuple is a new connection: picked anew, state reset.
    let mut picks = std::collections::BTreeSet::new();
    for _ in 0..30 {
        t.run(&tcp_with_flags((CLIENT, 40100), (VIP, 80), FIN | ACK));
        picks.insert(dst(&t.run(&syn).frame));
    }
    assert!(picks.len() > 1, "reopened flows are picked anew: {picks:?}");
    assert_eq!(state_of(&t, 40100), Some(0));

    // Timeouts: with 1 ns everywhere every entry is expired a moment later.
    let tiny = lb_common::Config {
        tcp_established_ns: 1,
        tcp_syn_ns: 1,
        tcp_closing_ns: 1,
        udp_ns: 1,
        ..lb_common::Config::DEFAULT
    };
    t.dp.set_config(tiny).unwrap();
    let reply = tcp_with_flags(first, (CLIENT, 40200), ACK);
    t.run(&tcp_with_flags((CLIENT, 40200), (VIP, 80), SYN));
    std::thread::sleep(std::time::Duration::from_millis(30));
    let out = t.run_egress(&reply);
    assert_eq!(
        out.frame, reply,
        "an expired reply entry translates nothing"
    );
    let before = t.dp.conntrack_len().unwrap();
    assert!(before > 0);
    let now = t.dp.clock_ns().unwrap();
    let gc = t.dp.collect_conntrack_garbage(now).unwrap();
    assert_eq!((gc.entries, gc.deleted), (0, before));
}

#[test]
fn a_direct_connection_from_a_service_flows_port_is_not_rewritten() {
    let mut t = with_web_service(vec![backend(1, 8080)]);
    let pod = (*backend(1, 8080).ip(), 8080);
    t.run(&tcp_with_flags((CLIENT, 40300), (VIP, 80), SYN));
    let reply = tcp_with_flags(pod, (CLIENT, 40300), SYN | ACK);
    assert_eq!(src(&t.run_egress(&reply).frame), (VIP, 80));
    t.run(&tcp_with_flags((CLIENT, 40300), (VIP, 80), FIN | ACK));
    // The client now connects to the pod directly from the same port.
    let direct = tcp_with_flags((CLIENT, 40300), pod, SYN);
    assert_eq!(t.run(&direct).frame, direct);
    let out = t.run_egress(&reply);
    assert_eq!(
        out.frame, reply,
        "the direct flow's replies keep the pod's address"
    );
    assert_eq!(t.counter("pass_no_service"), 2);
}

#[test]
fn icmp_replies_for_services_without_endpoints_are_rate_limited() {
    let mut t = TestDatapath::new();
    t.program(&[(tcp_frontend(VIP, 81), vec![])]);
    t.dp.set_config(lb_common::Config {
        icmp_replies_per_sec: 5,
        ..lb_common::Config::DEFAULT
    })
    .unwrap();
    // Each CPU has a bucket of 5; the test thread may move between CPUs.
    let actions: Vec<u32> = (0..20)
        .map(|i| {
            t.run(&tcp_with_flags((CLIENT, 40400 + i), (VIP, 81), SYN))
                .action
        })
        .collect();
    let answered = actions.iter().filter(|a| **a == TC_ACT_REDIRECT).count();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!((5..=5 * cpus + 1).contains(&answered), "{actions:?}");
    assert_eq!(
        t.counter("drop_icmp_rate_limited") as usize,
        20 - answered,
        "{actions:?}"
    );
}

const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 1);
const PORT_UNREACHABLE: (u8, u8) = (3, 3);
const FRAG_NEEDED: (u8, u8) = (3, 4);
const TIME_EXCEEDED: (u8, u8) = (11, 0);

/// Every checksum of an ICMP error frame: outer IPv4, ICMP, quoted IPv4.
fn icmp_error_checksums_valid(frame: &[u8]) -> bool {
    use lb_common::checksum::checksum;
    checksum(&frame[14..34]) == 0 && checksum(&frame[34..]) == 0 && checksum(&frame[42..62]) == 0
}

#[test]
fn icmp_errors_about_translated_flows_are_translated_both_ways() {
    let mut t = TestDatapath::new();
    t.program(&[
        (tcp_frontend(VIP, 80), vec![backend(1, 8080)]),
        (udp_frontend(VIP, 53), vec![backend(1, 5353)]),
    ]);
    for (protocol, port, target) in [(TCP, 80, 8080), (UDP, 53, 5353)] {
        let pod = *backend(1, target).ip();
        let request = ipv4_frame(protocol, (CLIENT, 40000), (VIP, port), b"request bytes");
        let sent = t.run(&request).frame;
        assert_eq!(dst(&sent), (pod, target));

        // Toward the client, about what it sent: the backend's own error, a router's
        // fragmentation-needed and time-exceeded; whole quotes and 8-byte ones.
        let whole = request.len() - 14;
        for (from, (kind, code), quote_len) in [
            (pod, PORT_UNREACHABLE, whole),
            (pod, PORT_UNREACHABLE, 28),
            (ROUTER, FRAG_NEEDED, whole),
            (ROUTER, TIME_EXCEEDED, 28),
        ] {
            let name = format!("{protocol}/{kind}/{code} from {from}, {quote_len}-byte quote");
            let error = icmp_error_frame(from, CLIENT, kind, code, &sent, quote_len);
            let entering = t.run(&error);
            assert_eq!(
                entering.frame, error,
                "{name}: passes where it enters the node"
            );
            let out = t.run_egress(&error);
            assert_eq!(out.action, TC_ACT_OK, "{name}");
            let sender = if from == pod { VIP } else { ROUTER };
            assert_eq!(&out.frame[26..30], &sender.octets(), "{name}: outer source");
            assert_eq!(
                &out.frame[30..34],
                &CLIENT.octets(),
                "{name}: outer destination"
            );
            assert!(icmp_error_checksums_valid(&out.frame), "{name}: checksums");
            // The quote is what the client sent, to the Service, checksums included.
            assert_eq!(
                &out.frame[42..],
                &request[14..14 + quote_len],
                "{name}: quote as the client sent it"
            );
            assert_eq!(
                &out.frame[34..36],
                &error[34..36],
                "{name}: ICMP type and code"
            );
            assert_eq!(
                &out.frame[38..42],
                &error[38..42],
                "{name}: rest of header (MTU)"
            );
        }

        // From the client, about a reply it got from the Service: on to the backend.
        let reply = ipv4_frame(protocol, (pod, target), (CLIENT, 40000), b"answer");
        let shown = t.run_egress(&reply).frame;
        assert_eq!(src(&shown), (VIP, port));
        let error = icmp_error_frame(CLIENT, VIP, 3, 3, &shown, shown.len() - 14);
        assert_eq!(
            t.run_egress(&error).frame,
            error,
            "passes on its way to the client"
        );
        let out = t.run(&error);
        assert_eq!(out.action, TC_ACT_OK);
        assert_eq!(&out.frame[26..30], &CLIENT.octets());
        assert_eq!(&out.frame[30..34], &pod.octets(), "goes to the backend");
        assert!(icmp_error_checksums_valid(&out.frame));
        assert_eq!(
            &out.frame[42..],
            &reply[14..],
            "quote as the backend sent it"
        );
    }
    assert_eq!(t.counter("icmp_error_translated"), 2 * 5);

    // Errors about no tracked flow, and other ICMP messages, pass untouched.
    let stranger = ipv4_frame(UDP, (CLIENT, 40001), (*backend(1, 5353).ip(), 5353), b"");
    let error = icmp_error_frame(ROUTER, CLIENT, 3, 1, &stranger, 28);
    for out in [t.run(&error), t.run_egress(&error)] {
        assert_eq!(out.frame, error);
    }
    assert_eq!(t.counter("pass_icmp_error"), 2 + 2 * 5);
    let echo = icmp_error_frame(CLIENT, VIP, 8, 0, &stranger, 28);
    let before = t.counter("pass_not_tcp_udp");
    assert_eq!(t.run(&echo).frame, echo);
    assert_eq!(t.counter("pass_not_tcp_udp"), before + 1);
}

fn with_ip_id(mut frame: Vec<u8>, id: u16) -> Vec<u8> {
    frame[18..20].copy_from_slice(&id.to_be_bytes());
    frame
}

#[test]
fn fragments_of_a_translated_datagram_follow_its_first_fragment() {
    let mut t = TestDatapath::new();
    t.program(&[(udp_frontend(VIP, 53), vec![backend(1, 5353)])]);
    let pod = *backend(1, 5353).ip();
    let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();

    // A 4,000-byte request in three fragments, in order.
    let request = with_ip_id(ipv4_frame(UDP, (CLIENT, 40000), (VIP, 53), &payload), 0x100);
    let pieces = fragments(&request, 1480);
    assert_eq!(pieces.len(), 3);
    let out: Vec<_> = pieces.iter().map(|f| t.run(f)).collect();
    for o in &out {
        assert_eq!(o.action, TC_ACT_OK);
        assert!(ip_checksum_valid(&o.frame));
        assert_eq!(
            &o.frame[30..34],
            &pod.octets(),
            "every fragment goes to the backend"
        );
    }
    let whole = reassemble(&out.iter().map(|o| o.frame.clone()).collect::<Vec<_>>());
    assert_eq!(dst(&whole), (pod, 5353));
    assert!(
        l4_checksum_valid(&whole),
        "the datagram's checksum, fixed in the first"
    );
    assert_eq!(&whole[42..], &payload[..]);

    // A 4,000-byte reply, fragmented by the backend, on its way out to the client.
    let reply = with_ip_id(
        ipv4_frame(UDP, (pod, 5353), (CLIENT, 40000), &payload),
        0x200,
    );
    let out: Vec<_> = fragments(&reply, 1480)
        .iter()
        .map(|f| t.run_egress(f).frame)
        .collect();
    let whole = reassemble(&out);
    assert_eq!(src(&whole), (VIP, 53));
    assert_eq!(dst(&whole), (CLIENT, 40000));
    assert!(l4_checksum_valid(&whole));
    assert!(out.iter().all(|f| ip_checksum_valid(f)));

    // A later fragment ahead of its first one cannot be matched: it passes as it is.
    let early = with_ip_id(ipv4_frame(UDP, (CLIENT, 40001), (VIP, 53), &payload), 0x300);
    let pieces = fragments(&early, 1480);
    let before = t.counter("pass_fragment");
    assert_eq!(t.run(&pieces[2]).frame, pieces[2]);
    assert_eq!(t.counter("pass_fragment"), before + 1);
    assert_eq!(&t.run(&pieces[0]).frame[30..34], &pod.octets());
    assert_eq!(&t.run(&pieces[1]).frame[30..34], &pod.octets());

    // Fragments of datagrams to no Service pass untouched, and are not remembered.
    let other = with_ip_id(
        ipv4_frame(
            UDP,
            (CLIENT, 40002),
            (Ipv4Addr::new(198, 18, 9, 9), 53),
            &payload,
        ),
        0x400,
    );
    for f in fragments(&other, 1480) {
        assert_eq!(t.run(&f).frame, f);
        assert_eq!(t.run_egress(&f).frame, f);
    }
    // Same addresses and IP id as the request above but another protocol: no match.
    let mut tcp_later = pieces[1].clone();
    tcp_later[23] = TCP;
    tcp_later[18..20].copy_from_slice(&0x300u16.to_be_bytes());
    tcp_later[24..26].copy_from_slice(&[0, 0]);
    let c = lb_common::checksum::checksum(&tcp_later[14..34]);
    tcp_later[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(t.run(&tcp_later).frame, tcp_later);
}

#[test]
fn a_pod_picked_as_its_own_backend_gets_its_answer() {
    let mut t = TestDatapath::new();
    // The client is the Service's only endpoint.
    t.program(&[(tcp_frontend(VIP, 80), vec![SocketAddrV4::new(CLIENT, 8080)])]);
    let syn = tcp_with_flags((CLIENT, 40000), (VIP, 80), SYN);
    let out = t.run(&syn);
    assert_eq!(
        out.action, TC_ACT_REDIRECT,
        "sent back out of the link it came in on"
    );
    assert_eq!(src(&out.frame), (VIP, 40000), "from the Service address");
    assert_eq!(dst(&out.frame), (CLIENT, 8080));
    assert_eq!(&out.frame[0..6], &syn[6..12], "to the pod's MAC");
    assert_eq!(&out.frame[6..12], &syn[0..6]);
    assert!(ip_checksum_valid(&out.frame) && l4_checksum_valid(&out.frame));
    assert_eq!(
        t.run_egress(&out.frame).frame,
        out.frame,
        "nothing more on the way out"
    );

    // The pod answers the Service address, which sends the answer back to the pod as coming
    // from the Service port it called.
    let answer = tcp_with_flags((CLIENT, 8080), (VIP, 40000), SYN | ACK);
    let out = t.run(&answer);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(src(&out.frame), (VIP, 80));
    assert_eq!(dst(&out.frame), (CLIENT, 40000));
    assert!(ip_checksum_valid(&out.frame) && l4_checksum_valid(&out.frame));

    // The connection goes on the same way.
    let ack = tcp_with_flags((CLIENT, 40000), (VIP, 80), ACK);
    let out = t.run(&ack);
    assert_eq!(
        (src(&out.frame), dst(&out.frame)),
        ((VIP, 40000), (CLIENT, 8080))
    );
    assert_eq!(t.counter("hairpin"), 3);
    assert_eq!(t.counter("dnat_new"), 1);
    assert_eq!(t.counter("dnat_established"), 1);
    assert_eq!(t.counter("reverse_nat"), 1);
}

#[test]
fn service_port_traffic_is_counted_both_ways_per_frontend() {
    let mut t = TestDatapath::new();
    let web = tcp_frontend(VIP, 80);
    let dns = udp_frontend(VIP, 53);
    t.program(&[(web, vec![backend(1, 8080)]), (dns, vec![backend(2, 5353)])]);
    let request = ipv4_frame(TCP, (CLIENT, 40000), (VIP, 80), b"GET / HTTP/1.0\r\n\r\n");
    let upload = ipv4_frame(TCP, (CLIENT, 40000), (VIP, 80), &[7u8; 300]);
    let reply = ipv4_frame(TCP, (*backend(1, 8080).ip(), 8080), (CLIENT, 40000), b"200");
    let query = ipv4_frame(UDP, (CLIENT, 5000), (VIP, 53), b"query");
    t.run(&request);
    t.run(&upload);
    // Where the reply enters the node it passes as it is: counted once, where translated.
    t.run(&reply);
    t.run_egress(&reply);
    t.run(&query);
    let elsewhere = Ipv4Addr::new(198, 19, 0, 11);
    t.run(&ipv4_frame(TCP, (CLIENT, 40001), (elsewhere, 80), b"x"));

    let traffic = t.dp.stats_reader().unwrap().traffic().unwrap();
    assert_eq!(traffic.len(), 2, "one entry per frontend: {traffic:?}");
    assert_eq!(
        traffic[&frontend_key(&web)],
        ServiceTraffic {
            packets_in: 2,
            bytes_in: (request.len() + upload.len()) as u64,
            packets_out: 1,
            bytes_out: reply.len() as u64,
        }
    );
    assert_eq!(
        traffic[&frontend_key(&dns)],
        ServiceTraffic {
            packets_in: 1,
            bytes_in: query.len() as u64,
            ..Default::default()
        }
    );
}

#[test]
fn drops_and_new_flows_are_logged_only_when_asked() {
    let mut t = TestDatapath::new();
    let captured = CapturedEvents::default();
    let mut reader = t.dp.event_reader(captured.clone()).unwrap();
    t.program(&[
        (tcp_frontend(VIP, 80), vec![backend(1, 8080)]),
        (tcp_frontend(VIP, 81), vec![]),
    ]);
    // No ICMP reply allowed: a SYN to the Service without endpoints is dropped.
    t.dp.set_config(lb_common::Config {
        icmp_replies_per_sec: 0,
        ..lb_common::Config::DEFAULT
    })
    .unwrap();
    let mut send = |t: &mut TestDatapath, port: u16| {
        let dropped = t.run(&tcp_with_flags((CLIENT, port), (VIP, 81), SYN));
        assert_eq!(dropped.action, TC_ACT_SHOT);
        t.run(&tcp_with_flags((CLIENT, port), (VIP, 80), SYN));
        reader.flush();
        std::mem::take(&mut *captured.0.lock().unwrap())
    };
    assert_eq!(send(&mut t, 41000), Vec::<String>::new(), "off by default");

    t.dp.set_events(EventsLevel::Drops).unwrap();
    assert_eq!(
        send(&mut t, 41001),
        vec![
            "drop: no endpoints, ICMP reply over the rate: TCP 198.18.1.1:41001 -> 198.19.0.10:81"
                .to_string()
        ]
    );

    t.dp.set_events(EventsLevel::Flows).unwrap();
    let events = send(&mut t, 41002);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events[0].starts_with("drop: "), "{events:?}");
    assert!(
        events[1].starts_with(
            "new flow: TCP 198.18.1.1:41002 -> 198.19.0.10:80: backend 198.18.2.1:8080 (service id "
        ),
        "{events:?}"
    );

    t.dp.set_events(EventsLevel::Off).unwrap();
    assert_eq!(send(&mut t, 41003), Vec::<String>::new(), "off again");
}

#[test]
fn the_maps_read_back_in_batches_equal_what_was_written() {
    let mut t = TestDatapath::new();
    let frontends: Vec<_> = (0..300u32)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(VIP) + i);
            let backends = (0..(i % 7) as u8).map(|k| backend(k + 1, 8080 + i as u16));
            (tcp_frontend(ip, 80), backends.collect())
        })
        .collect();
    t.program(&frontends);
    let read = t.dp.read_actual().unwrap();
    assert_eq!(read.frontends, t.actual.frontends);
    assert_eq!(read.slots, t.actual.slots);
    assert_eq!(read.backends, t.actual.backends);
    assert_eq!(read.frontends.len(), 300);
    // Fewer backends for every frontend: the batch of clears and puts reads back too.
    let fewer: Vec<_> = frontends
        .iter()
        .map(|(f, b): &(_, Vec<SocketAddrV4>)| (*f, b.iter().take(2).copied().collect()))
        .collect();
    t.program(&fewer);
    let read = t.dp.read_actual().unwrap();
    assert_eq!(read.slots, t.actual.slots);
    assert_eq!(read.backends, t.actual.backends);
}
