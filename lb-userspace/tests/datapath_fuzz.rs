//! Millions of random and mutated frames through the TC programs (ingress and egress) and
//! through the XDP program of external links with BPF_PROG_TEST_RUN, checked against a model
//! of what the datapath must do with each one: TCP/UDP flows, their fragments and ICMP errors
//! quoting them; nodePorts and LoadBalancer addresses, source-NATed or not, and their replies.
mod support;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use aya::programs::{TestRun, TestRunOptions};
use lb::{
    dataplane::{TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM},
    desired::{Algorithm, Backends, Frontend, Scope},
    model::Protocol,
};
use lb_common::conntrack;
use support::{
    datapath::{TestDatapath, tcp_frontend, udp_frontend},
    packet::*,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

/// Frames per run; FUZZ_FRAMES overrides (e.g. for a longer soak).
const DEFAULT_FRAMES: usize = 3_000_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Tuple {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    protocol: u8,
}

impl Tuple {
    fn reversed(&self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
            protocol: self.protocol,
        }
    }
}

/// What the datapath must do, given the services and the flows it has seen: each conntrack
/// entry's NAT address and the TCP state it recorded.
struct Model {
    services: HashMap<((Ipv4Addr, u16), u8), Vec<SocketAddrV4>>,
    forward: HashMap<Tuple, ((Ipv4Addr, u16), u8)>,
    reply: HashMap<Tuple, ((Ipv4Addr, u16), u8)>,
    fragments: FirstFragments,
}

impl Model {
    /// A packet of a tracked flow: its entry's state moves on, and a change is copied to the
    /// other direction's entry.
    fn advance(&mut self, tuple: Tuple, forward: bool, flags: u8) {
        let (map, peer_map) = if forward {
            (&mut self.forward, &mut self.reply)
        } else {
            (&mut self.reply, &mut self.forward)
        };
        let (nat, state) = map[&tuple];
        let next = conntrack::next_state(state, tuple.protocol, flags);
        if next == state {
            return;
        }
        map.insert(tuple, (nat, next));
        let peer = if forward {
            Tuple {
                src: nat,
                dst: tuple.src,
                protocol: tuple.protocol,
            }
        } else {
            Tuple {
                src: tuple.dst,
                dst: nat,
                protocol: tuple.protocol,
            }
        };
        if let Some((_, s)) = peer_map.get_mut(&peer) {
            *s |= next;
        }
    }
}

fn tcp_flags(frame: &[u8], protocol: u8) -> u8 {
    if protocol == TCP { frame[47] } else { 0 }
}

/// What the datapath can look at in a frame.
enum Kind {
    /// Not IPv4, malformed, options, another protocol: passes byte-identical.
    Opaque,
    /// A TCP/UDP datagram or its first fragment (`first_fragment`).
    Flow { tuple: Tuple, first_fragment: bool },
    /// A later fragment: addresses, IP id and protocol; no ports.
    LaterFragment {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        id: u16,
        protocol: u8,
    },
    /// A destination-unreachable or time-exceeded error quoting a TCP/UDP datagram.
    IcmpError { quoted: Tuple },
}

fn classify(f: &[u8]) -> Kind {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] != 0x45 {
        return Kind::Opaque;
    }
    let protocol = f[23];
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    if 14 + total > f.len() {
        return Kind::Opaque;
    }
    let frag = u16::from_be_bytes([f[20], f[21]]);
    if protocol == 1 {
        if frag & 0x3fff != 0 || total < 56 || ![3, 11].contains(&f[34]) {
            return Kind::Opaque;
        }
        let q = &f[42..];
        let quoted_frag = u16::from_be_bytes([q[6], q[7]]);
        if q[0] != 0x45 || quoted_frag & 0x1fff != 0 || ![TCP, UDP].contains(&q[9]) {
            return Kind::Opaque;
        }
        return Kind::IcmpError {
            quoted: Tuple {
                src: (
                    Ipv4Addr::new(q[12], q[13], q[14], q[15]),
                    u16::from_be_bytes([q[20], q[21]]),
                ),
                dst: (
                    Ipv4Addr::new(q[16], q[17], q[18], q[19]),
                    u16::from_be_bytes([q[22], q[23]]),
                ),
                protocol: q[9],
            },
        };
    }
    let l4_min = match protocol {
        TCP => 20,
        UDP => 8,
        _ => return Kind::Opaque,
    };
    if frag & 0x1fff != 0 {
        if total <= 20 {
            return Kind::Opaque;
        }
        return Kind::LaterFragment {
            src: Ipv4Addr::new(f[26], f[27], f[28], f[29]),
            dst: Ipv4Addr::new(f[30], f[31], f[32], f[33]),
            id: u16::from_be_bytes([f[18], f[19]]),
            protocol,
        };
    }
    if total < 20 + l4_min || f.len() < 34 + l4_min {
        return Kind::Opaque;
    }
    Kind::Flow {
        tuple: Tuple {
            src: src(f),
            dst: dst(f),
            protocol,
        },
        first_fragment: frag & 0x2000 != 0,
    }
}

/// Translated first fragments: (source, destination, IP id, protocol) -> ports.
type FirstFragments = HashMap<(Ipv4Addr, Ipv4Addr, u16, u8), (u16, u16)>;

/// The flow a TCP/UDP datagram or fragment of `kind` belongs to, which part of its datagram
/// it is, and its TCP flags (none in a later fragment). A later fragment's ports come from
/// its first fragment: `None` if none was translated.
fn flow_of(
    frame: &[u8],
    kind: Kind,
    first_fragments: &FirstFragments,
) -> Option<(Tuple, Fragment, u8)> {
    match kind {
        Kind::LaterFragment {
            src,
            dst,
            id,
            protocol,
        } => {
            let &(sport, dport) = first_fragments.get(&(src, dst, id, protocol))?;
            let tuple = Tuple {
                src: (src, sport),
                dst: (dst, dport),
                protocol,
            };
            Some((tuple, Fragment::Later, 0))
        }
        Kind::Flow {
            tuple,
            first_fragment,
        } => {
            let fragment = if first_fragment {
                Fragment::First
            } else {
                Fragment::Whole
            };
            Some((tuple, fragment, tcp_flags(frame, tuple.protocol)))
        }
        Kind::Opaque | Kind::IcmpError { .. } => None,
    }
}

fn l4_csum_off(f: &[u8]) -> usize {
    if f[23] == TCP { 50 } else { 40 }
}

#[test]
fn random_and_mutated_frames_keep_every_invariant() {
    let frames: usize = std::env::var("FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_FRAMES);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1bc0_ffee);
    eprintln!("fuzzing {frames} frames, FUZZ_SEED={seed}");
    let mut rng = Rng(seed);

    let vip = |i: u8| Ipv4Addr::new(198, 19, 0, i);
    let backend = |i: u8, port: u16| SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, i), port);
    let mut t = TestDatapath::new();
    // No entry expires and no ICMP reply is rate-limited during the run: both are checked by
    // the tables, not here.
    let hours = 24 * 3_600_000_000_000;
    t.dp.set_config(lb_common::Config {
        tcp_established_ns: hours,
        tcp_syn_ns: hours,
        tcp_closing_ns: hours,
        udp_ns: hours,
        icmp_replies_per_sec: 1_000_000_000,
        ..lb_common::Config::DEFAULT
    })
    .unwrap();
    let services = [
        (
            tcp_frontend(vip(1), 80),
            vec![backend(1, 8080), backend(2, 8080), backend(3, 8080)],
        ),
        (udp_frontend(vip(1), 53), vec![backend(4, 5353)]),
        (tcp_frontend(vip(2), 443), vec![backend(5, 443)]),
        (tcp_frontend(vip(3), 80), vec![]),
    ];
    // Both ways of choosing: the first Service by Maglev with ClientIP affinity, the others
    // by Maglev.
    t.algorithm = Algorithm::Maglev { table_size: 251 };
    let programmed: Vec<_> = services
        .iter()
        .enumerate()
        .map(|(i, (f, b))| {
            let backends = Backends {
                affinity_timeout_s: (i == 0).then_some(10_800),
                ..Backends::serving(b.clone())
            };
            (*f, backends)
        })
        .collect();
    t.program_backends(&programmed);
    let maps_before = t.dp.read_actual().unwrap();
    let mut model = Model {
        services: services
            .iter()
            .map(|(f, b)| (((f.ip, f.port), f.protocol.number()), b.clone()))
            .collect(),
        forward: HashMap::new(),
        reply: HashMap::new(),
        fragments: HashMap::new(),
    };

    // Templates the mutations start from: service traffic, replies, other traffic.
    let clients = [Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 2)];
    let mut out = vec![0u8; 2048];
    let (mut translated, mut unreachable, mut passed, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let mut icmp_translated = 0u64;
    let started = Instant::now();
    for i in 0..frames {
        let frame = make_frame(&mut rng, &clients, &vip, &backend, i);
        let egress = rng.below(2) == 0;
        let program = if egress {
            TC_EGRESS_PROGRAM
        } else {
            TC_INGRESS_PROGRAM
        };
        let prog = t.dp.classifier(program).unwrap();
        let opts = TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = match prog.test_run(opts) {
            Ok(r) => r,
            Err(_) => {
                // The kernel refuses some inputs before running the program (e.g. an IPv4
                // ethertype with less than an IPv4 header).
                refused += 1;
                continue;
            }
        };
        let output = &out[..result.data_size_out as usize];
        let context = || format!("frame {i} at {program} (FUZZ_SEED={seed}): {frame:02x?}");
        let unchanged = |why: &str| {
            assert_eq!(result.return_value, TC_ACT_OK, "{}", context());
            assert_eq!(
                output,
                &frame[..],
                "{why} must pass byte-identical: {}",
                context()
            );
        };
        let kind = classify(&frame);
        match kind {
            Kind::Opaque => {
                unchanged("untranslatable frame");
                passed += 1;
                continue;
            }
            Kind::IcmpError { quoted } => {
                // The entry of the flow the quoted datagram belongs to, on the side this
                // hook serves: ingress, a reply the client got; egress, what it sent.
                let target = if egress {
                    model.reply.get(&quoted.reversed())
                } else {
                    model.forward.get(&quoted.reversed())
                };
                match target {
                    Some(&(to, _)) => {
                        check_icmp_translated(&frame, output, !egress, to, context);
                        icmp_translated += 1;
                    }
                    None => {
                        unchanged("ICMP error of no flow");
                        passed += 1;
                    }
                }
                continue;
            }
            _ => {}
        }
        let Some((tuple, fragment, flags)) = flow_of(&frame, kind, &model.fragments) else {
            unchanged("later fragment of no translated datagram");
            passed += 1;
            continue;
        };
        let remember = |model: &mut Model| {
            if fragment == Fragment::First {
                let key = (tuple.src.0, tuple.dst.0, ip_id(&frame), tuple.protocol);
                model.fragments.insert(key, (tuple.src.1, tuple.dst.1));
            }
        };
        if egress {
            // Replies of tracked flows get the Service address back; nothing else changes.
            match model.reply.get(&tuple) {
                Some(&(vip_addr, _)) => {
                    check_translated(&frame, output, 26, vip_addr, fragment, context);
                    model.advance(tuple, false, flags);
                    remember(&mut model);
                    translated += 1;
                }
                None => {
                    unchanged("egress frame of no reply");
                    passed += 1;
                }
            }
            continue;
        }
        let service = model.services.get(&(tuple.dst, tuple.protocol)).cloned();
        let reopened = model
            .forward
            .get(&tuple)
            .is_some_and(|(_, state)| conntrack::reopens(*state, tuple.protocol, flags));
        if reopened {
            let (old_backend, _) = model.forward[&tuple];
            model.reply.remove(&Tuple {
                src: old_backend,
                dst: tuple.src,
                protocol: tuple.protocol,
            });
        }
        if let Some(&(backend_addr, _)) = model.forward.get(&tuple).filter(|_| !reopened) {
            check_translated(&frame, output, 30, backend_addr, fragment, context);
            model.advance(tuple, true, flags);
            remember(&mut model);
            translated += 1;
        } else if model.reply.contains_key(&tuple) && !reopened {
            unchanged("a reply where it enters the node");
            passed += 1;
        } else if let Some(backends) = service {
            if backends.is_empty() {
                if fragment == Fragment::Later {
                    unchanged("later fragment to a Service without endpoints");
                    passed += 1;
                    continue;
                }
                assert_eq!(result.return_value, TC_ACT_REDIRECT, "{}", context());
                assert_eq!(output.len(), 70, "{}", context());
                assert_eq!(
                    lb_common::checksum::checksum(&output[14..34]),
                    0,
                    "{}",
                    context()
                );
                assert_eq!(
                    lb_common::checksum::checksum(&output[34..]),
                    0,
                    "{}",
                    context()
                );
                assert_eq!(&output[42..70], &frame[14..42], "{}", context());
                unreachable += 1;
                continue;
            }
            let chosen = if fragment == Fragment::Later {
                // No ports in the packet: the backend is found by its address.
                backends
                    .iter()
                    .find(|b| output[30..34] == b.ip().octets())
                    .map(|b| (*b.ip(), b.port()))
            } else {
                let d = dst(output);
                backends
                    .iter()
                    .find(|b| (*b.ip(), b.port()) == d)
                    .map(|_| d)
            };
            let chosen =
                chosen.unwrap_or_else(|| panic!("new flow not sent to a backend: {}", context()));
            check_translated(&frame, output, 30, chosen, fragment, context);
            let state = conntrack::next_state(0, tuple.protocol, flags);
            model.forward.insert(tuple, (chosen, state));
            model.reply.insert(
                Tuple {
                    src: chosen,
                    dst: tuple.src,
                    protocol: tuple.protocol,
                },
                (tuple.dst, state),
            );
            remember(&mut model);
            translated += 1;
        } else {
            // A direct flow opened from the port of an earlier flow through a Service ends
            // that flow's reply entry.
            let opens = tuple.protocol == UDP
                || flags & (conntrack::TCP_SYN | conntrack::TCP_ACK) == conntrack::TCP_SYN;
            if opens {
                model.reply.remove(&tuple.reversed());
            }
            unchanged("non-service frame");
            passed += 1;
        }
    }
    eprintln!(
        "{frames} frames in {:.1?}: {translated} translated, {icmp_translated} ICMP errors translated, {unreachable} answered unreachable, {passed} passed unchanged, {refused} refused by the kernel",
        started.elapsed()
    );
    assert!(
        translated > frames as u64 / 20 && passed > frames as u64 / 20,
        "the mix must exercise both paths"
    );
    assert!(
        icmp_translated > frames as u64 / 1000,
        "the mix must exercise ICMP errors"
    );

    // The service maps are as the agent wrote them; conntrack holds exactly the flows seen.
    assert_eq!(
        t.dp.read_actual().unwrap(),
        maps_before,
        "service maps unchanged by traffic"
    );
    let ct = t.dp.conntrack_len().unwrap();
    assert_eq!(
        ct,
        model.forward.len() + model.reply.len(),
        "conntrack entries = flows created x 2"
    );
}

/// Where the XDP program sends a packet it translated.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Send {
    /// To the stack (an endpoint on this node).
    Stack,
    /// Back out of the uplink to this next hop.
    Out([u8; 6]),
    /// Routed, but to a neighbour not resolved yet: passed on unchanged, for the TC program.
    Unresolved,
    /// No route: dropped.
    NoRoute,
}

/// A conntrack entry of a flow from outside the cluster as the XDP program must have recorded
/// it: what its packets become, where they go, and the other direction's entry.
#[derive(Clone, Copy, Debug)]
struct ExternalEntry {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    send: Send,
    forward: bool,
    peer: Tuple,
    state: u8,
}

/// The XDP program on an external link, in a namespace whose routes and neighbours its FIB
/// lookups find: nodePorts (TCP with endpoints on this node and another, UDP on another, a
/// Local-policy one without local endpoints), a LoadBalancer address open to one client only,
/// and one without endpoints; then random and mutated frames around them, checked against a
/// model: what it translates (new flows, established ones, replies, fragments) is rewritten
/// exactly, with every checksum as valid as it was, and sent where the model says; everything
/// else passes byte-identical or is dropped where the policy says.
#[test]
fn random_and_mutated_frames_through_the_xdp_program() {
    use support::uplink::{
        CLIENT, CLIENT_NEXT_HOP, NODE, OTHER_NODE_NEXT_HOP, in_test_netns, local_pod, remote_pod,
        xdp,
    };
    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;
    const XDP_TX: u32 = 3;
    let frames: usize = std::env::var("FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_FRAMES);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1bc0_ffee);
    in_test_netns(move |uplink| {
        eprintln!("fuzzing {frames} frames through XDP, FUZZ_SEED={seed}");
        let mut rng = Rng(seed);
        let mut t = TestDatapath::new();
        let hours = 24 * 3_600_000_000_000;
        t.dp.set_config(lb_common::Config {
            tcp_established_ns: hours,
            tcp_syn_ns: hours,
            tcp_closing_ns: hours,
            udp_ns: hours,
            ..lb_common::Config::DEFAULT
        })
        .unwrap();
        t.dp.set_node_addresses(&[NODE]).unwrap();
        let other_client = Ipv4Addr::new(198, 18, 254, 101);
        let lb_ip = Ipv4Addr::new(198, 18, 200, 1);
        let empty_lb_ip = Ipv4Addr::new(198, 18, 200, 2);
        let external = |ip: Ipv4Addr, port: u16, protocol: Protocol, scope: Scope| Frontend {
            ip,
            port,
            protocol,
            scope,
        };
        let remote_udp = SocketAddrV4::new(*remote_pod(1).ip(), 5353);
        let services = [
            (
                external(Ipv4Addr::UNSPECIFIED, 30080, Protocol::Tcp, Scope::Cluster),
                Backends::serving(vec![local_pod(1), local_pod(2), remote_pod(1)]),
            ),
            (
                external(Ipv4Addr::UNSPECIFIED, 30053, Protocol::Udp, Scope::Cluster),
                Backends::serving(vec![remote_udp]),
            ),
            (
                external(Ipv4Addr::UNSPECIFIED, 30081, Protocol::Tcp, Scope::External),
                Backends::default(),
            ),
            (
                external(lb_ip, 80, Protocol::Tcp, Scope::Cluster),
                Backends {
                    source_ranges: vec![format!("{CLIENT}/32").parse().unwrap()],
                    ..Backends::serving(vec![local_pod(3), remote_pod(1)])
                },
            ),
            (
                external(empty_lb_ip, 80, Protocol::Tcp, Scope::Cluster),
                Backends::default(),
            ),
        ];
        t.program_backends(&services);
        let maps_before = t.dp.read_actual().unwrap();
        // What each destination the clients call is, by (address, port, protocol).
        let frontend_of = |dst: (Ipv4Addr, u16), protocol: u8| {
            services.iter().find(|(f, _)| {
                f.port == dst.1
                    && f.protocol.number() == protocol
                    && (f.ip == dst.0 || f.ip.is_unspecified() && dst.0 == NODE)
            })
        };
        // Where the namespace's routes and neighbours send a packet to `ip` (asked of the
        // kernel for the addresses mutations make).
        let mut routes: HashMap<Ipv4Addr, Send> = HashMap::new();
        let mut send_to = |ip: Ipv4Addr| {
            *routes.entry(ip).or_insert_with(|| {
                if ip == *remote_pod(1).ip() {
                    return Send::Out(OTHER_NODE_NEXT_HOP);
                }
                if [CLIENT, other_client].contains(&ip) {
                    return Send::Out(CLIENT_NEXT_HOP);
                }
                let route = std::process::Command::new("ip")
                    .args(["-o", "route", "get", &ip.to_string()])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&route.stdout);
                let kind = text.split_whitespace().next().unwrap_or("");
                // This node's own and broadcast addresses are not forwarded either.
                if !route.status.success() || ["local", "broadcast", "multicast"].contains(&kind) {
                    Send::NoRoute
                } else {
                    Send::Unresolved
                }
            })
        };
        let mut entries: HashMap<Tuple, ExternalEntry> = HashMap::new();
        let mut first_fragments = FirstFragments::new();
        let (mut new, mut established, mut replies, mut dropped, mut passed) = (0u64, 0, 0, 0, 0);
        let started = Instant::now();
        for i in 0..frames {
            let client = [CLIENT, other_client][rng.below(2) as usize];
            // A bounded set of client ports, so that flows repeat.
            let cport = 20000 + rng.below(2_000) as u16;
            let protocol = if rng.below(4) == 0 { UDP } else { TCP };
            let payload: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            let called = match rng.below(6) {
                0 => (NODE, [30080, 30053, 30081, 22][rng.below(4) as usize]),
                1 => ([lb_ip, empty_lb_ip][rng.below(2) as usize], 80),
                _ => (NODE, if protocol == UDP { 30053 } else { 30080 }),
            };
            let backend = [
                local_pod(1),
                local_pod(2),
                local_pod(3),
                remote_pod(1),
                remote_udp,
            ][rng.below(5) as usize];
            let backend = (*backend.ip(), backend.port());
            let mut frame = match rng.below(6) {
                // A backend's answer: to the client (local endpoints), or to this node at a
                // port it may have given a flow (the client's own, mostly).
                0 | 1 => {
                    let to = if rng.below(2) == 0 {
                        (client, cport)
                    } else {
                        (NODE, cport)
                    };
                    ipv4_frame(protocol, backend, to, &payload)
                }
                2 => {
                    // A fragment of a datagram to a frontend or of an answer; IP ids from a
                    // small set so that later fragments meet first ones.
                    let payload: Vec<u8> =
                        (0..64 + rng.below(200)).map(|_| rng.next() as u8).collect();
                    let cport = cport % 64 + 20000;
                    let mut whole = if rng.below(2) == 0 {
                        ipv4_frame(protocol, (client, cport), called, &payload)
                    } else {
                        ipv4_frame(protocol, backend, (NODE, cport), &payload)
                    };
                    whole[18..20].copy_from_slice(&(0x1234 + rng.below(4) as u16).to_be_bytes());
                    let pieces = fragments(&whole, 8 * (3 + rng.below(6) as usize));
                    let at = if rng.below(2) == 0 {
                        0
                    } else {
                        rng.below(pieces.len() as u64) as usize
                    };
                    pieces[at].clone()
                }
                _ => ipv4_frame(protocol, (client, cport), called, &payload),
            };
            mutate(&mut rng, &mut frame, i);

            let out = xdp(&mut t, uplink, &frame);
            let context = || format!("frame {i} (FUZZ_SEED={seed}): {frame:02x?}");
            let unchanged = |why: &str| {
                assert_eq!(out.action, XDP_PASS, "{why}: {}", context());
                assert_eq!(
                    out.frame,
                    frame,
                    "{why} must pass byte-identical: {}",
                    context()
                );
            };
            let kind = classify(&frame);
            if matches!(kind, Kind::Opaque | Kind::IcmpError { .. }) {
                unchanged("what XDP leaves to TC");
                passed += 1;
                continue;
            }
            let Some((tuple, fragment, flags)) = flow_of(&frame, kind, &first_fragments) else {
                unchanged("a later fragment of no translated datagram");
                passed += 1;
                continue;
            };
            // The packet rewritten as the entry says and sent where it says.
            let expect = |e: &ExternalEntry, first_fragments: &mut FirstFragments| {
                let next_hop = match e.send {
                    Send::Stack => None,
                    Send::Out(mac) => Some(mac),
                    Send::Unresolved => {
                        return unchanged("a packet to an unresolved neighbour");
                    }
                    Send::NoRoute => {
                        assert_eq!(out.action, XDP_DROP, "no route: {}", context());
                        return;
                    }
                };
                let action = if next_hop.is_some() { XDP_TX } else { XDP_PASS };
                assert_eq!(out.action, action, "{e:?} {}", context());
                check_rewritten(
                    &frame,
                    &out.frame,
                    Some(e.src),
                    Some(e.dst),
                    next_hop,
                    fragment,
                    context,
                );
                if fragment == Fragment::First {
                    let key = (tuple.src.0, tuple.dst.0, ip_id(&frame), tuple.protocol);
                    first_fragments.insert(key, (tuple.src.1, tuple.dst.1));
                }
            };
            let entry = entries.get(&tuple).copied();
            let reopened = entry
                .is_some_and(|e| e.forward && conntrack::reopens(e.state, tuple.protocol, flags));
            if let Some(e) = entry.filter(|_| !reopened) {
                expect(&e, &mut first_fragments);
                // The entry's state moves on, and a change is copied to the other direction.
                let next = conntrack::next_state(e.state, tuple.protocol, flags);
                if next != e.state {
                    entries.get_mut(&tuple).unwrap().state = next;
                    if let Some(peer) = entries.get_mut(&e.peer) {
                        peer.state |= next;
                    }
                }
                if e.forward {
                    established += 1;
                } else {
                    replies += 1;
                }
                continue;
            }
            if let Some(e) = entry {
                // Reopened: the flow starts over, its old reply entry goes.
                entries.remove(&e.peer);
            }
            let Some((frontend, backends)) = frontend_of(tuple.dst, tuple.protocol) else {
                unchanged("a packet to no frontend");
                passed += 1;
                continue;
            };
            if !backends.source_ranges.is_empty() && tuple.src.0 != CLIENT {
                assert_eq!(
                    out.action,
                    XDP_DROP,
                    "outside the source ranges: {}",
                    context()
                );
                dropped += 1;
                continue;
            }
            if backends.serving.is_empty() {
                if frontend.scope == Scope::External {
                    assert_eq!(out.action, XDP_DROP, "no local endpoint: {}", context());
                    dropped += 1;
                } else {
                    unchanged("a Service without endpoints (TC answers it)");
                    passed += 1;
                }
                continue;
            }
            if fragment == Fragment::Later {
                unchanged("a later fragment of a new flow");
                passed += 1;
                continue;
            }
            let chosen = dst(&out.frame);
            assert!(
                backends
                    .serving
                    .iter()
                    .any(|b| (*b.ip(), b.port()) == chosen),
                "a new flow goes to one of its frontend's endpoints (action {}: {:02x?}) {:?}: {}",
                out.action,
                t.dp.stats().unwrap(),
                out.frame,
                context()
            );
            let send = if chosen.0 == *remote_pod(1).ip() {
                send_to(chosen.0)
            } else {
                Send::Stack
            };
            // Sent on to another node from this node's address, at a port of no other flow
            // to that endpoint (the client's own if free).
            let from = if send != Send::Stack {
                let from = src(&out.frame);
                assert_eq!(from.0, NODE, "{}", context());
                from
            } else {
                tuple.src
            };
            let reply = Tuple {
                src: chosen,
                dst: from,
                protocol: tuple.protocol,
            };
            assert!(
                !entries.contains_key(&reply),
                "a source port no other flow to the endpoint has: {}",
                context()
            );
            let state = conntrack::next_state(0, tuple.protocol, flags);
            let forward = ExternalEntry {
                src: from,
                dst: chosen,
                send,
                forward: true,
                peer: reply,
                state,
            };
            expect(&forward, &mut first_fragments);
            entries.insert(tuple, forward);
            entries.insert(
                reply,
                ExternalEntry {
                    src: tuple.dst,
                    dst: tuple.src,
                    send: send_to(tuple.src.0),
                    forward: false,
                    peer: tuple,
                    state,
                },
            );
            new += 1;
        }
        eprintln!(
            "{frames} frames in {:.1?}: {new} new flows, {established} established, {replies} replies, {dropped} dropped, {passed} passed unchanged",
            started.elapsed()
        );
        for (what, n) in [
            ("new", new),
            ("established", established),
            ("replies", replies),
        ] {
            assert!(
                n > frames as u64 / 200,
                "the mix must exercise {what} flows"
            );
        }
        assert!(dropped > 0 && passed > frames as u64 / 20);
        assert_eq!(
            t.dp.read_actual().unwrap(),
            maps_before,
            "service maps unchanged by traffic"
        );
        assert_eq!(
            t.dp.conntrack_len().unwrap(),
            entries.len(),
            "conntrack holds exactly the flows' entries"
        );
    });
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fragment {
    Whole,
    First,
    Later,
}

fn ip_id(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[18], f[19]])
}

/// The output differs from the input only in the rewritten address/port (at `addr_off`) and the
/// checksums (see [`check_rewritten`]).
fn check_translated(
    input: &[u8],
    output: &[u8],
    addr_off: usize,
    to: (Ipv4Addr, u16),
    fragment: Fragment,
    context: impl Fn() -> String,
) {
    let (src, dst) = if addr_off == 26 {
        (Some(to), None)
    } else {
        (None, Some(to))
    };
    check_rewritten(input, output, src, dst, None, fragment, context);
}

/// The output differs from the input only in the new source and destination given (address
/// and port), the destination MAC address given and the checksums, and each checksum is
/// exactly as valid as it was: a header that arrived with a bad checksum still has one (and
/// the kernel drops it later, as it would have anyway). A later fragment has no ports: only
/// its addresses and IPv4 checksum change.
fn check_rewritten(
    input: &[u8],
    output: &[u8],
    src: Option<(Ipv4Addr, u16)>,
    dst: Option<(Ipv4Addr, u16)>,
    next_hop: Option<[u8; 6]>,
    fragment: Fragment,
    context: impl Fn() -> String,
) {
    assert_eq!(output.len(), input.len(), "{}", context());
    let whole_l4 = fragment != Fragment::Later;
    let csum = l4_csum_off(input);
    let mut rewritten = vec![false; input.len()];
    for (to, addr_off, port_off) in [(src, 26, 34), (dst, 30, 36)] {
        let Some(to) = to else { continue };
        assert_eq!(
            &output[addr_off..addr_off + 4],
            &to.0.octets(),
            "{}",
            context()
        );
        rewritten[addr_off..addr_off + 4].fill(true);
        if whole_l4 {
            assert_eq!(
                &output[port_off..port_off + 2],
                &to.1.to_be_bytes(),
                "{}",
                context()
            );
            rewritten[port_off..port_off + 2].fill(true);
            rewritten[csum..csum + 2].fill(true);
        }
    }
    rewritten[24..26].fill(true);
    if let Some(mac) = next_hop {
        assert_eq!(&output[0..6], &mac, "to the next hop: {}", context());
        // The source MAC: the sending link's.
        rewritten[0..12].fill(true);
    }
    for (i, (a, b)) in input.iter().zip(output).enumerate() {
        if !rewritten[i] {
            assert_eq!(a, b, "byte {i} changed: {}", context());
        }
    }
    let ip_valid = |f: &[u8]| lb_common::checksum::checksum(&f[14..34]) == 0;
    assert_eq!(
        ip_valid(output),
        ip_valid(input),
        "IPv4 checksum validity: {}",
        context()
    );
    if !whole_l4 {
        return;
    }
    let udp_without_checksum = input[23] == UDP && input[40..42] == [0, 0];
    if udp_without_checksum {
        assert_eq!(
            &output[40..42],
            &[0, 0],
            "UDP without checksum keeps none: {}",
            context()
        );
    } else {
        assert_eq!(
            l4_checksum_valid(output),
            l4_checksum_valid(input),
            "L4 checksum validity: {}",
            context()
        );
    }
}

/// An ICMP error's quoted end (ingress: its source; egress: its destination) now reads `to`,
/// the outer address on that side too if it was the same; only those bytes and the
/// checksums changed, and every checksum is exactly as valid as it was.
fn check_icmp_translated(
    input: &[u8],
    output: &[u8],
    ingress: bool,
    to: (Ipv4Addr, u16),
    context: impl Fn() -> String,
) {
    use lb_common::checksum::checksum;
    assert_eq!(output.len(), input.len(), "{}", context());
    let (outer, quoted_addr, quoted_port) = if ingress { (30, 54, 62) } else { (26, 58, 64) };
    assert_eq!(
        &output[quoted_addr..quoted_addr + 4],
        &to.0.octets(),
        "{}",
        context()
    );
    assert_eq!(
        &output[quoted_port..quoted_port + 2],
        &to.1.to_be_bytes(),
        "{}",
        context()
    );
    let outer_replaced = input[outer..outer + 4] == input[quoted_addr..quoted_addr + 4];
    let expected_outer = if outer_replaced {
        to.0.octets()
    } else {
        input[outer..outer + 4].try_into().unwrap()
    };
    assert_eq!(&output[outer..outer + 4], &expected_outer, "{}", context());
    let total = 14 + u16::from_be_bytes([input[16], input[17]]) as usize;
    let quoted_l4_csum = if input[42 + 9] == UDP { 68 } else { 78 };
    for (i, (a, b)) in input.iter().zip(output).enumerate() {
        let rewritten = (outer..outer + 4).contains(&i)
            || (24..26).contains(&i)
            || (36..38).contains(&i)
            || (quoted_addr..quoted_addr + 4).contains(&i)
            || (quoted_port..quoted_port + 2).contains(&i)
            || (52..54).contains(&i)
            || (quoted_l4_csum..quoted_l4_csum + 2).contains(&i) && i < total;
        if !rewritten {
            assert_eq!(a, b, "byte {i} changed: {}", context());
        }
    }
    for (name, range) in [
        ("outer IPv4", 14..34),
        ("ICMP", 34..total),
        ("quoted IPv4", 42..62),
    ] {
        assert_eq!(
            checksum(&output[range.clone()]) == 0,
            checksum(&input[range]) == 0,
            "{name} checksum validity: {}",
            context()
        );
    }
}

fn make_frame(
    rng: &mut Rng,
    clients: &[Ipv4Addr],
    vip: &impl Fn(u8) -> Ipv4Addr,
    backend: &impl Fn(u8, u16) -> SocketAddrV4,
    i: usize,
) -> Vec<u8> {
    if rng.below(10) == 0 {
        // Pure noise, sometimes with an IPv4 ethertype.
        let len = 14 + rng.below(120) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 {
            f[12] = 0x08;
            f[13] = 0x00;
        }
        return f;
    }
    let client = clients[rng.below(clients.len() as u64) as usize];
    // A bounded set of client ports, so that flows repeat (established and reply paths).
    let cport = 20000 + rng.below(20_000) as u16;
    let protocol = if rng.below(4) == 0 { UDP } else { TCP };
    let payload: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
    let service = (
        vip(1 + rng.below(3) as u8),
        [80, 53, 443][rng.below(3) as usize],
    );
    let pod = {
        let b = backend(
            1 + rng.below(5) as u8,
            [8080, 5353, 443][rng.below(3) as usize],
        );
        (*b.ip(), b.port())
    };
    let mut f = match rng.below(8) {
        5 => {
            // An ICMP error toward the client about what it sent (as sent on to a backend),
            // from the backend or a router.
            let sent = ipv4_frame(protocol, (client, cport), pod, &payload);
            let from = if rng.below(2) == 0 {
                pod.0
            } else {
                Ipv4Addr::new(198, 18, 254, 1)
            };
            let quote = if rng.below(2) == 0 {
                28
            } else {
                sent.len() - 14
            };
            let (kind, code) = [(3, 3), (3, 4), (11, 0), (3, 1)][rng.below(4) as usize];
            icmp_error_frame(from, client, kind, code, &sent, quote)
        }
        6 => {
            // An ICMP error from the client about a reply it got from a Service.
            let got = ipv4_frame(protocol, service, (client, cport), &payload);
            let quote = if rng.below(2) == 0 {
                28
            } else {
                got.len() - 14
            };
            icmp_error_frame(client, service.0, 3, 3, &got, quote)
        }
        7 => {
            // A fragment of a datagram to a Service or of a backend's reply; IP ids from a
            // small set so that later fragments meet first ones.
            let payload: Vec<u8> = (0..64 + rng.below(200)).map(|_| rng.next() as u8).collect();
            let whole = if rng.below(2) == 0 {
                ipv4_frame(protocol, (client, cport % 64 + 20000), service, &payload)
            } else {
                ipv4_frame(protocol, pod, (client, cport % 64 + 20000), &payload)
            };
            let mut whole = whole;
            whole[18..20].copy_from_slice(&(0x1234 + rng.below(4) as u16).to_be_bytes());
            let pieces = fragments(&whole, 8 * (3 + rng.below(6) as usize));
            // First fragments more often, so that the later ones find theirs.
            let at = if rng.below(2) == 0 {
                0
            } else {
                rng.below(pieces.len() as u64) as usize
            };
            pieces[at].clone()
        }
        0 => ipv4_frame(
            protocol,
            (client, cport),
            (
                vip(1 + rng.below(3) as u8),
                [80, 53, 443][rng.below(3) as usize],
            ),
            &payload,
        ),
        1 => {
            let b = backend(
                1 + rng.below(5) as u8,
                [8080, 5353, 443][rng.below(3) as usize],
            );
            ipv4_frame(protocol, (*b.ip(), b.port()), (client, cport), &payload)
        }
        2 => ipv4_frame(
            protocol,
            (client, cport),
            (Ipv4Addr::new(198, 18, 9, rng.below(255) as u8), 80),
            &payload,
        ),
        _ => ipv4_frame(protocol, (client, cport), (vip(1), 80), &payload),
    };
    mutate(rng, &mut f, i);
    f
}

/// Mutates about every other frame in one to three ways: bytes and bits, truncation, the
/// fields the datapath branches on (version and header length, fragment bits, protocol, total
/// length), trailing bytes.
fn mutate(rng: &mut Rng, f: &mut Vec<u8>, i: usize) {
    // Mutations: none for about half, so that valid traffic is common.
    let mutations = if i.is_multiple_of(2) {
        0
    } else {
        1 + rng.below(3)
    };
    for _ in 0..mutations {
        let header_mutation = rng.below(8);
        if f.len() < 34 && (3..=6).contains(&header_mutation) {
            continue;
        }
        match header_mutation {
            0 => {
                let at = rng.below(f.len() as u64) as usize;
                f[at] = rng.next() as u8;
            }
            1 => {
                let at = rng.below(f.len() as u64) as usize;
                f[at] ^= 1 << rng.below(8);
            }
            2 => f.truncate(14 + rng.below(f.len() as u64 - 13) as usize),
            3 => f[14] = [0x44, 0x46, 0x4f, 0x65, 0x45][rng.below(5) as usize],
            4 => f[20] = [0x20, 0x00, 0x40, 0x1f][rng.below(4) as usize],
            5 => f[23] = [1, 6, 17, 58, 132][rng.below(5) as usize],
            6 => {
                let total = rng.below(200) as u16;
                f[16..18].copy_from_slice(&total.to_be_bytes());
            }
            _ => f.extend((0..rng.below(32)).map(|_| rng.next() as u8)),
        }
    }
}
