//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table the agent builds
//! for a Service port, and the flow hash the datapath indexes it with.
//!
//! Both are pure functions of what every node sees alike (the endpoints' addresses and ports,
//! the table size, the packet's 5-tuple): every node builds the same table and sends a given
//! flow to the same endpoint, whichever node it enters.

/// The default table size (entries per Service port), a prime.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
/// Table sizes accepted: primes in this range.
pub const MIN_TABLE_SIZE: u32 = 251;
pub const MAX_TABLE_SIZE: u32 = 131_071;
/// A table gives every endpoint within 1 % of its share when it has at least this many
/// entries per endpoint.
pub const ENTRIES_PER_ENDPOINT: u32 = 100;

/// Whether `n` is prime (trial division: table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Why a table size is refused, or `None` for a usable one.
pub fn table_size_problem(size: u32) -> Option<&'static str> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
        Some("out of range: the Maglev table size must be a prime from 251 to 131071")
    } else if !is_prime(size) {
        Some("not a prime: the Maglev table size must be a prime (such as 16381)")
    } else {
        None
    }
}

/// MurmurHash3's 64-bit finalizer: every input bit flips about half of the output bits.
#[inline(always)]
pub const fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[cfg(any(test, feature = "user"))]
const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
#[cfg(any(test, feature = "user"))]
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"
const FLOW_SEED: u64 = 0x6c62_666c_6f77_6873; // "lbflowhs"

/// An endpoint as the table sees it: its address and port (both in host order).
pub const fn endpoint_key(addr: [u8; 4], port: u16) -> u64 {
    ((u32::from_be_bytes(addr) as u64) << 16) | port as u64
}

#[cfg(any(test, feature = "user"))]
/// Where an endpoint's preference list starts, and its stride (`size` prime, so every stride
/// from 1 to size - 1 visits every entry).
const fn permutation(endpoint: u64, size: u32) -> (u64, u64) {
    let size = size as u64;
    let offset = mix64(endpoint ^ OFFSET_SEED) % size;
    let skip = mix64(endpoint ^ SKIP_SEED) % (size - 1) + 1;
    (offset, skip)
}

/// The hash of a flow's 5-tuple that picks its table entry: addresses and ports as on the
/// wire (network byte order), so every node computes the same one.
#[inline(always)]
pub fn flow_hash(src: [u8; 4], dst: [u8; 4], sport_be: u16, dport_be: u16, protocol: u8) -> u32 {
    let addrs = ((u32::from_be_bytes(src) as u64) << 32) | u32::from_be_bytes(dst) as u64;
    let ports = ((crate::host_port(sport_be) as u64) << 24)
        | ((crate::host_port(dport_be) as u64) << 8)
        | protocol as u64;
    let h = mix64(addrs ^ mix64(ports ^ FLOW_SEED));
    (h ^ (h >> 32)) as u32
}

/// The table entry of a flow hash.
#[inline(always)]
pub fn table_index(hash: u32, size: u32) -> u32 {
    if size == 0 { 0 } else { hash % size }
}

/// Fills `table` (its length is the table size, a prime) with indices into `endpoints`:
/// each endpoint claims, in turn, the next free entry of its own preference list, until the
/// table is full. Endpoints that appear in any order give the same table; an empty list
/// leaves the table untouched.
#[cfg(any(test, feature = "user"))]
pub fn populate(endpoints: &[u64], table: &mut [u32]) {
    extern crate alloc;
    use alloc::vec::Vec;

    const FREE: u32 = u32::MAX;
    let size = table.len() as u32;
    if endpoints.is_empty() || size < 2 {
        return;
    }
    // Claims depend on the turn order: sort, so every node takes the same turns.
    let mut order: Vec<(u64, u32)> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| (*e, i as u32))
        .collect();
    order.sort_unstable();
    let mut cursor: Vec<(u64, u64, u64)> = order
        .iter()
        .map(|(e, _)| {
            let (offset, skip) = permutation(*e, size);
            (offset, skip, 0)
        })
        .collect();
    table.fill(FREE);
    let mut filled = 0usize;
    loop {
        for (turn, (offset, skip, next)) in cursor.iter_mut().enumerate() {
            let mut entry = (*offset + *next * *skip) % size as u64;
            while table[entry as usize] != FREE {
                *next += 1;
                entry = (*offset + *next * *skip) % size as u64;
            }
            table[entry as usize] = order[turn].1;
            *next += 1;
            filled += 1;
            if filled == table.len() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{vec, vec::Vec};

    fn endpoints(n: u32) -> Vec<u64> {
        (0..n)
            .map(|i| endpoint_key([198, 18, (i / 250) as u8, (i % 250 + 1) as u8], 8080))
            .collect()
    }

    fn table(endpoints: &[u64], size: u32) -> Vec<u32> {
        let mut t = vec![0; size as usize];
        populate(endpoints, &mut t);
        t
    }

    /// Each entry's endpoint, by key, so that tables over different lists compare.
    fn owners(endpoints: &[u64], table: &[u32]) -> Vec<u64> {
        table.iter().map(|i| endpoints[*i as usize]).collect()
    }

    #[test]
    fn primes_are_told_apart() {
        assert!(is_prime(16_381) && is_prime(251) && is_prime(131_071) && is_prime(2));
        assert!(!is_prime(16_383) && !is_prime(1) && !is_prime(0) && !is_prime(65_536));
        assert_eq!(table_size_problem(DEFAULT_TABLE_SIZE), None);
        assert!(table_size_problem(16_000).unwrap().contains("not a prime"));
        assert!(table_size_problem(131).unwrap().contains("out of range"));
        assert!(
            table_size_problem(262_147)
                .unwrap()
                .contains("out of range")
        );
    }

    #[test]
    fn the_table_is_deterministic_and_independent_of_endpoint_order() {
        let eps = endpoints(7);
        let a = table(&eps, 251);
        assert_eq!(a, table(&eps, 251));
        let mut reversed = eps.clone();
        reversed.reverse();
        let b = table(&reversed, 251);
        assert_eq!(owners(&eps, &a), owners(&reversed, &b));
    }

    #[test]
    fn every_endpoint_gets_its_share_within_one_percent() {
        for n in [1u32, 3, 10, 100, 163] {
            let eps = endpoints(n);
            let t = table(&eps, DEFAULT_TABLE_SIZE);
            let mut counts = vec![0u32; n as usize];
            for i in &t {
                counts[*i as usize] += 1;
            }
            let share = DEFAULT_TABLE_SIZE as f64 / n as f64;
            for (i, c) in counts.iter().enumerate() {
                let off = (*c as f64 - share).abs() / share;
                assert!(
                    off <= 0.01,
                    "{n} endpoints: endpoint {i} has {c} entries, share {share:.1}"
                );
            }
        }
    }

    /// Entries whose endpoint differs between two tables.
    fn moved(before: &[u64], after: &[u64]) -> usize {
        before.iter().zip(after).filter(|(a, b)| a != b).count()
    }

    #[test]
    fn removing_an_endpoint_reassigns_its_entries_and_few_others() {
        let size = DEFAULT_TABLE_SIZE;
        for n in [10u32, 50] {
            let eps = endpoints(n);
            let before = owners(&eps, &table(&eps, size));
            let gone = eps[3];
            let rest: Vec<u64> = eps.iter().copied().filter(|e| *e != gone).collect();
            let after = owners(&rest, &table(&rest, size));
            let its = before.iter().filter(|e| **e == gone).count();
            assert!(after.iter().all(|e| *e != gone));
            let others_moved = moved(&before, &after) - its;
            let share = others_moved as f64 / (size as usize - its) as f64;
            std::println!(
                "maglev M={size} N={n}: removing one endpoint moved its {its} entries and {others_moved} others ({:.2} % of the rest)",
                share * 100.0
            );
            assert!(
                share < 0.03,
                "{n} endpoints: {share} of the other entries moved"
            );
        }
    }

    #[test]
    fn adding_an_endpoint_takes_about_its_share() {
        let size = DEFAULT_TABLE_SIZE;
        let n = 10u32;
        let eps = endpoints(n + 1);
        let before = owners(&eps[..n as usize], &table(&eps[..n as usize], size));
        let after = owners(&eps, &table(&eps, size));
        let taken = after.iter().filter(|e| **e == eps[n as usize]).count();
        let share = size as f64 / (n + 1) as f64;
        assert!((taken as f64 - share).abs() / share <= 0.01);
        let total_moved = moved(&before, &after);
        let ratio = total_moved as f64 / size as f64;
        std::println!(
            "maglev M={size}: adding an 11th endpoint moved {total_moved} entries ({:.2} %, ideal {:.2} %)",
            ratio * 100.0,
            100.0 / (n + 1) as f64
        );
        assert!(ratio < 1.0 / (n + 1) as f64 + 0.03, "{ratio}");
    }

    #[test]
    fn an_empty_endpoint_list_leaves_the_table_alone() {
        let mut t = vec![7u32; 251];
        populate(&[], &mut t);
        assert!(t.iter().all(|i| *i == 7));
        let one = table(&endpoints(1), 251);
        assert!(one.iter().all(|i| *i == 0));
    }

    #[test]
    fn flow_hashes_spread_over_the_table() {
        let size = 251u32;
        let mut counts = vec![0u32; size as usize];
        for port in 0..25_100u32 {
            let h = flow_hash(
                [198, 18, 1, 5],
                [198, 19, 0, 10],
                crate::net_port(port as u16 + 10_000),
                crate::net_port(80),
                6,
            );
            counts[table_index(h, size) as usize] += 1;
        }
        // 100 per entry expected: none far off.
        assert!(counts.iter().all(|c| (50..=160).contains(c)), "{counts:?}");
        let a = flow_hash([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, 6);
        assert_eq!(a, flow_hash([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, 6));
        assert_ne!(a, flow_hash([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, 17));
    }
}
