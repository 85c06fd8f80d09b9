//! Millions of random and mutated frames through the TC program with BPF_PROG_TEST_RUN,
//! checked against a model of what the datapath must do with each one.
mod support;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use aya::programs::{TestRun, TestRunOptions};
use lb::dataplane::TC_INGRESS_PROGRAM;
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

/// A frame the datapath may translate: well-formed IPv4 TCP/UDP, no options, not a fragment.
fn translatable(f: &[u8]) -> Option<Tuple> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] != 0x45 {
        return None;
    }
    let protocol = f[23];
    let l4_min = match protocol {
        TCP => 20,
        UDP => 8,
        _ => return None,
    };
    if u16::from_be_bytes([f[20], f[21]]) & 0x3fff != 0 {
        return None;
    }
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    if total < 20 + l4_min || 14 + total > f.len() || f.len() < 34 + l4_min {
        return None;
    }
    Some(Tuple {
        src: src(f),
        dst: dst(f),
        protocol,
    })
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
    })
    .unwrap();
    let services = vec![
        (
            tcp_frontend(vip(1), 80),
            vec![backend(1, 8080), backend(2, 8080), backend(3, 8080)],
        ),
        (udp_frontend(vip(1), 53), vec![backend(4, 5353)]),
        (tcp_frontend(vip(2), 443), vec![backend(5, 443)]),
        (tcp_frontend(vip(3), 80), vec![]),
    ];
    t.program(&services);
    let maps_before = t.dp.read_actual().unwrap();
    let mut model = Model {
        services: services
            .iter()
            .map(|(f, b)| (((f.ip, f.port), f.protocol.number()), b.clone()))
            .collect(),
        forward: HashMap::new(),
        reply: HashMap::new(),
    };

    // Templates the mutations start from: service traffic, replies, other traffic.
    let clients = [Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 2)];
    let mut out = vec![0u8; 2048];
    let (mut translated, mut unreachable, mut passed, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    for i in 0..frames {
        let frame = make_frame(&mut rng, &clients, &vip, &backend, i);
        let prog = t.dp.classifier(TC_INGRESS_PROGRAM).unwrap();
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
        let context = || format!("frame {i} (FUZZ_SEED={seed}): {frame:02x?}");
        let Some(tuple) = translatable(&frame) else {
            assert_eq!(result.return_value, TC_ACT_OK, "{}", context());
            assert_eq!(
                output,
                &frame[..],
                "untranslatable frame must pass byte-identical: {}",
                context()
            );
            passed += 1;
            continue;
        };
        let service = model.services.get(&(tuple.dst, tuple.protocol)).cloned();
        let flags = tcp_flags(&frame, tuple.protocol);
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
            check_translated(&frame, output, 30, backend_addr, context);
            model.advance(tuple, true, flags);
            translated += 1;
        } else if let Some(&(vip_addr, _)) = model.reply.get(&tuple).filter(|_| !reopened) {
            check_translated(&frame, output, 26, vip_addr, context);
            model.advance(tuple, false, flags);
            translated += 1;
        } else if let Some(backends) = service {
            if backends.is_empty() {
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
            let chosen = dst(output);
            assert!(
                backends.iter().any(|b| (*b.ip(), b.port()) == chosen),
                "new flow went to {chosen:?}, not a backend: {}",
                context()
            );
            check_translated(&frame, output, 30, chosen, context);
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
            translated += 1;
        } else {
            // A direct flow opened from the port of an earlier flow through a Service ends
            // that flow's reply entry.
            let opens = tuple.protocol == UDP
                || flags & (conntrack::TCP_SYN | conntrack::TCP_ACK) == conntrack::TCP_SYN;
            if opens {
                model.reply.remove(&tuple.reversed());
            }
            assert_eq!(result.return_value, TC_ACT_OK, "{}", context());
            assert_eq!(
                output,
                &frame[..],
                "non-service frame must pass byte-identical: {}",
                context()
            );
            passed += 1;
        }
    }
    eprintln!(
        "{frames} frames in {:.1?}: {translated} translated, {unreachable} answered unreachable, {passed} passed unchanged, {refused} refused by the kernel",
        started.elapsed()
    );
    assert!(
        translated > frames as u64 / 20 && passed > frames as u64 / 20,
        "the mix must exercise both paths"
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

/// The output differs from the input only in the rewritten address/port (at `addr_off`) and the
/// checksums, and each checksum is exactly as valid as it was: a header that arrived with a
/// bad checksum still has one (and the kernel drops it after TC, as it would have anyway).
fn check_translated(
    input: &[u8],
    output: &[u8],
    addr_off: usize,
    to: (Ipv4Addr, u16),
    context: impl Fn() -> String,
) {
    assert_eq!(output.len(), input.len(), "{}", context());
    let port_off = if addr_off == 30 { 36 } else { 34 };
    assert_eq!(
        &output[addr_off..addr_off + 4],
        &to.0.octets(),
        "{}",
        context()
    );
    assert_eq!(
        &output[port_off..port_off + 2],
        &to.1.to_be_bytes(),
        "{}",
        context()
    );
    let csum = l4_csum_off(input);
    for (i, (a, b)) in input.iter().zip(output).enumerate() {
        let rewritten = (addr_off..addr_off + 4).contains(&i)
            || (port_off..port_off + 2).contains(&i)
            || (24..26).contains(&i)
            || (csum..csum + 2).contains(&i);
        if !rewritten {
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
    let mut f = match rng.below(5) {
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
    f
}
