//! How new flows pick their backend, through BPF_PROG_TEST_RUN: ClientIP session affinity and
//! Maglev consistent hashing.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::maps::HashMap as BpfHashMap;
use lb::desired::{Algorithm, Backends};
use lb_common::{AFFINITY_MAP, Affinity, AffinityKey};
use support::{
    datapath::{TestDatapath, tcp_frontend},
    packet::*,
    web::maglev_endpoint,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const S: u64 = 1_000_000_000;

fn client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, i)
}

fn backend(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, i), 8080)
}

fn backends(n: u8) -> Vec<SocketAddrV4> {
    (1..=n).map(backend).collect()
}

fn with_affinity(serving: Vec<SocketAddrV4>, timeout_s: u32) -> Backends {
    Backends {
        affinity_timeout_s: Some(timeout_s),
        ..Backends::serving(serving)
    }
}

/// The backend a new TCP flow from `from` gets.
fn pick(t: &mut TestDatapath, from: (Ipv4Addr, u16)) -> Ipv4Addr {
    dst(&t.run(&ipv4_frame(TCP, from, (VIP, 80), b"")).frame).0
}

fn service_id(t: &TestDatapath) -> u32 {
    let key = lb::diff::frontend_key(&tcp_frontend(VIP, 80));
    t.actual.frontends[&key].service_id
}

fn affinity_of(t: &TestDatapath, from: Ipv4Addr) -> Option<Affinity> {
    let key = AffinityKey {
        service_id: service_id(t),
        client: from.octets(),
    };
    t.dp.affinity_entries()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn set_affinity(t: &mut TestDatapath, from: Ipv4Addr, entry: Affinity) {
    let key = AffinityKey {
        service_id: service_id(t),
        client: from.octets(),
    };
    let mut map: BpfHashMap<_, AffinityKey, Affinity> =
        BpfHashMap::try_from(t.dp.ebpf().map_mut(AFFINITY_MAP).unwrap()).unwrap();
    map.insert(key, entry, 0).unwrap();
}

#[test]
fn affinity_keeps_a_client_on_one_backend_and_spreads_clients() {
    let mut t = TestDatapath::new();
    t.program_backends(&[(tcp_frontend(VIP, 80), with_affinity(backends(4), 10_800))]);
    let mut per_client = BTreeMap::new();
    for c in 1..=40u8 {
        let picks: BTreeSet<_> = (0..50u16)
            .map(|p| pick(&mut t, (client(c), 20_000 + p)))
            .collect();
        assert_eq!(picks.len(), 1, "client {c} went to {picks:?}");
        per_client.insert(c, *picks.first().unwrap());
    }
    let used: BTreeSet<_> = per_client.values().collect();
    // 40 clients on 1 of 4 backends each: all on one has probability 4 * 4^-40.
    assert!(used.len() > 1, "{per_client:?}");
    assert_eq!(t.counter("dnat_new"), 40 * 50);
    let entry = affinity_of(&t, client(1)).expect("client 1's entry");
    let pinned = t.actual.backends[&entry.backend_id];
    assert_eq!(pinned.addr[..4], per_client[&1].octets());
}

#[test]
fn an_expired_entry_is_ignored_and_replaced() {
    let mut t = TestDatapath::new();
    t.program_backends(&[(tcp_frontend(VIP, 80), with_affinity(backends(4), 2))]);
    let first = pick(&mut t, (client(1), 30_000));
    let pinned = affinity_of(&t, client(1)).unwrap();
    // One second idle of two: still held.
    let now = t.dp.clock_ns().unwrap();
    set_affinity(
        &mut t,
        client(1),
        Affinity {
            last_used_ns: now - S,
            ..pinned
        },
    );
    assert_eq!(pick(&mut t, (client(1), 30_001)), first);
    let refreshed = affinity_of(&t, client(1)).unwrap();
    assert!(
        refreshed.last_used_ns >= now,
        "a new flow refreshes the entry"
    );
    // Three seconds idle: a new pick, recorded. 40 tries: all on the old backend has
    // probability 4^-40.
    let mut picks = BTreeSet::new();
    for p in 0..40u16 {
        let now = t.dp.clock_ns().unwrap();
        set_affinity(
            &mut t,
            client(1),
            Affinity {
                last_used_ns: now - 3 * S,
                ..pinned
            },
        );
        let to = pick(&mut t, (client(1), 31_000 + p));
        picks.insert(to);
        let entry = affinity_of(&t, client(1)).unwrap();
        assert_eq!(t.actual.backends[&entry.backend_id].addr[..4], to.octets());
        assert!(entry.last_used_ns >= now);
    }
    assert!(picks.len() > 1, "expired entries were followed: {picks:?}");
}

#[test]
fn a_client_moves_when_its_backend_stops_serving_or_goes() {
    let mut t = TestDatapath::new();
    let all = backends(3);
    t.program_backends(&[(tcp_frontend(VIP, 80), with_affinity(all.clone(), 60))]);
    let first = pick(&mut t, (client(1), 40_000));
    let gone = all.iter().find(|b| *b.ip() == first).copied().unwrap();
    let rest: Vec<_> = all.iter().copied().filter(|b| *b != gone).collect();
    // Not ready: draining, it keeps established flows but takes no new client.
    t.program_backends(&[(
        tcp_frontend(VIP, 80),
        Backends {
            draining: vec![gone],
            ..with_affinity(rest.clone(), 60)
        },
    )]);
    let moved = pick(&mut t, (client(1), 40_001));
    assert_ne!(moved, first);
    for p in 2..30u16 {
        assert_eq!(pick(&mut t, (client(1), 40_000 + p)), moved, "pinned anew");
    }
    // Removed: the same.
    let second = rest.iter().find(|b| *b.ip() == moved).copied().unwrap();
    let last: Vec<_> = rest.iter().copied().filter(|b| *b != second).collect();
    t.program_backends(&[(tcp_frontend(VIP, 80), with_affinity(last.clone(), 60))]);
    assert_eq!(pick(&mut t, (client(1), 41_000)), *last[0].ip());
}

#[test]
fn affinity_switched_off_spreads_again_and_its_entries_go() {
    let mut t = TestDatapath::new();
    t.program_backends(&[(tcp_frontend(VIP, 80), with_affinity(backends(4), 10_800))]);
    pick(&mut t, (client(1), 50_000));
    assert!(affinity_of(&t, client(1)).is_some());
    t.program(&[(tcp_frontend(VIP, 80), backends(4))]);
    assert_eq!(affinity_of(&t, client(1)), None, "entries forgotten");
    let picks: BTreeSet<_> = (0..40u16)
        .map(|p| pick(&mut t, (client(1), 50_001 + p)))
        .collect();
    assert!(picks.len() > 1, "{picks:?}");
    assert!(t.dp.affinity_entries().unwrap().is_empty(), "none recorded");

    // On again, then the Service goes: its clients' entries go with it.
    t.program_backends(&[(tcp_frontend(VIP, 80), with_affinity(backends(4), 10_800))]);
    pick(&mut t, (client(2), 51_000));
    assert_eq!(t.dp.affinity_entries().unwrap().len(), 1);
    t.program(&[]);
    assert!(t.dp.affinity_entries().unwrap().is_empty());
}

/// The endpoint a flow gets from the table every node builds, computed here on its own.
fn maglev_choice(endpoints: &[SocketAddrV4], size: u32, from: (Ipv4Addr, u16)) -> Ipv4Addr {
    let to = SocketAddrV4::new(VIP, 80);
    *maglev_endpoint(endpoints, size, SocketAddrV4::new(from.0, from.1), to).ip()
}

fn maglev_datapath(size: u32) -> TestDatapath {
    let mut t = TestDatapath::new();
    t.algorithm = Algorithm::Maglev { table_size: size };
    t
}

#[test]
fn maglev_picks_the_table_entry_of_the_flow_hash_on_every_node() {
    let size = 1021;
    let eps = backends(10);
    let mut node_a = maglev_datapath(size);
    node_a.program(&[(tcp_frontend(VIP, 80), eps.clone())]);
    // Node B got other Services first: its ids differ, its choices must not.
    let mut node_b = maglev_datapath(size);
    let other = Ipv4Addr::new(198, 19, 0, 99);
    node_b.program(&[(tcp_frontend(other, 80), (20..30).map(backend).collect())]);
    let mut reversed = eps.clone();
    reversed.reverse();
    node_b.program(&[
        (tcp_frontend(other, 80), (20..30).map(backend).collect()),
        (tcp_frontend(VIP, 80), reversed),
    ]);
    assert_ne!(service_id(&node_a), service_id(&node_b));
    let mut used = BTreeSet::new();
    for p in 0..300u16 {
        let from = (client((p % 7) as u8 + 1), 10_000 + p * 13);
        let expected = maglev_choice(&eps, size, from);
        assert_eq!(pick(&mut node_a, from), expected, "node A, flow {from:?}");
        assert_eq!(pick(&mut node_b, from), expected, "node B, flow {from:?}");
        used.insert(expected);
    }
    assert_eq!(used.len(), 10, "flows spread over every endpoint");
    // The table the datapath reads is the agent's.
    let table = node_a
        .dp
        .maglev_table(service_id(&node_a))
        .unwrap()
        .unwrap();
    assert_eq!(table.len(), size as usize);
}

#[test]
fn maglev_keeps_flows_when_an_endpoint_goes() {
    let size = 1021;
    let eps = backends(10);
    let mut t = maglev_datapath(size);
    t.program(&[(tcp_frontend(VIP, 80), eps.clone())]);
    let flows: Vec<_> = (0..500u16).map(|p| (client(1), 20_000 + p)).collect();
    let before: Vec<_> = flows.iter().map(|f| pick(&mut t, *f)).collect();
    let gone = eps[4];
    let rest: Vec<_> = eps.iter().copied().filter(|e| *e != gone).collect();
    t.program(&[(tcp_frontend(VIP, 80), rest)]);
    // The same 5-tuples as new flows (their conntrack entries cleared).
    t.dp.collect_conntrack_garbage(u64::MAX / 2).unwrap();
    let after: Vec<_> = flows.iter().map(|f| pick(&mut t, *f)).collect();
    let mut others_moved = 0;
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(a, gone.ip());
        if b != gone.ip() && a != b {
            others_moved += 1;
        }
    }
    let on_gone = before.iter().filter(|b| *b == gone.ip()).count();
    assert!(on_gone > 0);
    // Maglev moves a few entries besides the removed endpoint's (~1 % here).
    assert!(
        others_moved * 100 <= (flows.len() - on_gone) * 5,
        "{others_moved} of {} flows moved",
        flows.len() - on_gone
    );
}

#[test]
fn switching_maglev_off_deletes_the_table() {
    let mut t = maglev_datapath(251);
    t.program(&[(tcp_frontend(VIP, 80), backends(3))]);
    let id = service_id(&t);
    assert!(t.dp.maglev_table(id).unwrap().is_some());
    // An unchanged sync rewrites nothing.
    let plan = lb::diff::diff(
        &lb::desired::DesiredDataplane {
            frontends: [(tcp_frontend(VIP, 80), Backends::serving(backends(3)))].into(),
            algorithm: t.algorithm,
        },
        &t.actual,
    );
    assert!(plan.is_empty(), "{:?}", plan.ops());
    t.algorithm = Algorithm::Random;
    t.program(&[(tcp_frontend(VIP, 80), backends(3))]);
    assert_eq!(t.dp.maglev_table(id).unwrap(), None);
    let picks: BTreeSet<_> = (0..60u16)
        .map(|p| pick(&mut t, (client(1), 60_000 + p)))
        .collect();
    assert_eq!(picks.len(), 3);
}

#[test]
fn maglev_and_affinity_together_pin_the_first_pick() {
    let size = 251;
    let eps = backends(4);
    let mut t = maglev_datapath(size);
    t.program_backends(&[(tcp_frontend(VIP, 80), with_affinity(eps.clone(), 600))]);
    let first = (client(3), 12_345);
    let chosen = pick(&mut t, first);
    assert_eq!(chosen, maglev_choice(&eps, size, first));
    for p in 0..50u16 {
        assert_eq!(pick(&mut t, (client(3), 13_000 + p)), chosen);
    }
}
