//! Conntrack lifetimes: the TCP state an entry records and when it expires. Shared by the
//! datapath (which treats an expired entry as absent) and the agent's garbage collector.
use crate::{CT_FORWARD, CT_SNAT, Config, CtEntry, CtKey, PROTO_TCP, TokenBucket};

/// The flow has shown a TCP packet without SYN (the handshake got through), or is UDP.
pub const SEEN_NON_SYN: u8 = 1;
/// The flow has shown FIN or RST: it gets the short closing timeout.
pub const CLOSING: u8 = 2;

/// `last_seen_ns` is rewritten at most this often per flow (a map write per packet would
/// cost more than the lookup); timeouts are therefore exact to this much.
pub const REFRESH_NS: u64 = 1_000_000_000;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether a forward entry sends its flow back to the client's own address: the client was
/// picked as its own Service's backend. Such a flow is source-NATed to the Service address.
#[inline(always)]
pub fn is_hairpin_forward(key: &CtKey, entry: &CtEntry) -> bool {
    entry.flags & CT_SNAT == 0 && entry.nat_addr == key.src
}

/// Whether a reply entry belongs to a hairpin flow: its packets go to the Service address,
/// which the forward direction put in place of the client's.
#[inline(always)]
pub fn is_hairpin_reply(key: &CtKey, entry: &CtEntry) -> bool {
    entry.flags & CT_SNAT == 0 && entry.nat_addr == key.dst
}

/// The key of the other direction's entry: a forward entry's reply key (backend to client, or
/// to the Service address for a hairpin flow), or a reply entry's forward key (client to
/// Service). A source-NATed flow's reply goes to, and its client is, the entry's peer.
#[inline(always)]
pub fn peer_key(key: &CtKey, entry: &CtEntry) -> CtKey {
    if entry.flags & CT_SNAT != 0 {
        let (src, sport, dst, dport) = if entry.kind == CT_FORWARD {
            (
                entry.nat_addr,
                entry.nat_port,
                entry.peer_addr,
                entry.peer_port,
            )
        } else {
            (
                entry.peer_addr,
                entry.peer_port,
                entry.nat_addr,
                entry.nat_port,
            )
        };
        return CtKey {
            src,
            dst,
            sport,
            dport,
            protocol: key.protocol,
            _pad1: 0,
            _pad2: 0,
        };
    }
    if entry.kind == CT_FORWARD {
        let client = if is_hairpin_forward(key, entry) {
            key.dst
        } else {
            key.src
        };
        CtKey {
            src: entry.nat_addr,
            dst: client,
            sport: entry.nat_port,
            dport: key.sport,
            protocol: key.protocol,
            _pad1: 0,
            _pad2: 0,
        }
    } else {
        let client = if is_hairpin_reply(key, entry) {
            key.src
        } else {
            key.dst
        };
        CtKey {
            src: client,
            dst: entry.nat_addr,
            sport: key.dport,
            dport: entry.nat_port,
            protocol: key.protocol,
            _pad1: 0,
            _pad2: 0,
        }
    }
}

/// The state after a packet of the flow; `tcp_flags` is 0 for UDP.
#[inline(always)]
pub fn next_state(state: u8, protocol: u8, tcp_flags: u8) -> u8 {
    if protocol != PROTO_TCP {
        return state | SEEN_NON_SYN;
    }
    let mut next = state;
    if tcp_flags & TCP_SYN == 0 {
        next |= SEEN_NON_SYN;
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        next |= CLOSING;
    }
    next
}

/// A SYN without ACK on a flow that closed opens a new connection on the same addresses and
/// ports: it gets a backend chosen anew, as netfilter does for a SYN in TIME_WAIT.
#[inline(always)]
pub fn reopens(state: u8, protocol: u8, tcp_flags: u8) -> bool {
    protocol == PROTO_TCP && state & CLOSING != 0 && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// How long an entry in `state` may stay idle.
#[inline(always)]
pub fn timeout_ns(config: &Config, protocol: u8, state: u8) -> u64 {
    if protocol != PROTO_TCP {
        config.udp_ns
    } else if state & CLOSING != 0 {
        config.tcp_closing_ns
    } else if state & SEEN_NON_SYN != 0 {
        config.tcp_established_ns
    } else {
        config.tcp_syn_ns
    }
}

/// Whether the entry has been idle longer than its state allows. `now_ns` may lag an entry
/// another CPU just refreshed: that counts as not idle.
#[inline(always)]
pub fn expired(config: &Config, protocol: u8, entry: &CtEntry, now_ns: u64) -> bool {
    now_ns.saturating_sub(entry.last_seen_ns) > timeout_ns(config, protocol, entry.state)
}

/// Whether a packet must write the entry: its state changes, or its time is due a refresh.
#[inline(always)]
pub fn needs_write(entry: &CtEntry, next_state: u8, now_ns: u64) -> bool {
    next_state != entry.state || now_ns.saturating_sub(entry.last_seen_ns) >= REFRESH_NS
}

/// Takes a token from a bucket refilled at `rate` per second (at most 10^9), holding at most
/// `rate`. Whole tokens only: the time of a refill moves on only when one was added.
#[inline(always)]
pub fn take_token(bucket: &mut TokenBucket, rate: u64, now_ns: u64) -> bool {
    let elapsed = now_ns.saturating_sub(bucket.updated_ns);
    // Capped at a second (a full bucket), so the product cannot overflow.
    let capped = if elapsed > 1_000_000_000 {
        1_000_000_000
    } else {
        elapsed
    };
    let refill = capped * rate / 1_000_000_000;
    if refill > 0 {
        bucket.tokens = if bucket.tokens + refill > rate {
            rate
        } else {
            bucket.tokens + refill
        };
        bucket.updated_ns = now_ns;
    }
    if bucket.tokens == 0 {
        return false;
    }
    bucket.tokens -= 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PROTO_UDP;

    const S: u64 = 1_000_000_000;

    fn entry(state: u8, last_seen_ns: u64) -> CtEntry {
        CtEntry {
            state,
            last_seen_ns,
            ..Default::default()
        }
    }

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> CtKey {
        CtKey {
            src,
            dst,
            sport,
            dport,
            protocol: PROTO_TCP,
            _pad1: 0,
            _pad2: 0,
        }
    }

    #[test]
    fn peer_keys_pair_up_for_plain_and_hairpin_flows() {
        let (client, vip, backend) = ([198, 18, 1, 1], [198, 19, 0, 10], [198, 18, 2, 1]);
        for backend_addr in [backend, client] {
            let forward_key = key(client, 40000, vip, 80);
            let forward = CtEntry {
                nat_addr: backend_addr,
                nat_port: 8080,
                kind: CT_FORWARD,
                ..Default::default()
            };
            let reply_key = peer_key(&forward_key, &forward);
            let hairpin = backend_addr == client;
            let expected_dst = if hairpin { vip } else { client };
            assert_eq!(reply_key, key(backend_addr, 8080, expected_dst, 40000));
            let reply = CtEntry {
                nat_addr: vip,
                nat_port: 80,
                kind: crate::CT_REPLY,
                ..Default::default()
            };
            assert_eq!(is_hairpin_forward(&forward_key, &forward), hairpin);
            assert_eq!(is_hairpin_reply(&reply_key, &reply), hairpin);
            assert_eq!(peer_key(&reply_key, &reply), forward_key);
        }
    }

    #[test]
    fn peer_keys_pair_up_for_source_nated_flows() {
        // An outside client calls node 1's nodePort; the endpoint is on another node.
        let (client, node, backend) = ([198, 18, 254, 100], [198, 18, 254, 1], [198, 18, 2, 1]);
        let forward_key = key(client, 40000, node, 30080);
        let forward = CtEntry {
            nat_addr: backend,
            nat_port: 8080,
            kind: CT_FORWARD,
            peer_addr: node,
            peer_port: 40001,
            flags: crate::CT_SNAT | crate::CT_EXTERNAL,
            ..Default::default()
        };
        let reply_key = peer_key(&forward_key, &forward);
        assert_eq!(reply_key, key(backend, 8080, node, 40001));
        let reply = CtEntry {
            nat_addr: node,
            nat_port: 30080,
            kind: crate::CT_REPLY,
            peer_addr: client,
            peer_port: 40000,
            ..forward
        };
        assert!(!is_hairpin_forward(&forward_key, &forward));
        assert!(
            !is_hairpin_reply(&reply_key, &reply),
            "the reply goes to the node's address, but is no hairpin"
        );
        assert_eq!(peer_key(&reply_key, &reply), forward_key);
    }

    #[test]
    fn tcp_states_follow_the_flags() {
        let syn = next_state(0, PROTO_TCP, TCP_SYN);
        assert_eq!(syn, 0, "a SYN alone is a handshake");
        let est = next_state(syn, PROTO_TCP, TCP_ACK);
        assert_eq!(est, SEEN_NON_SYN);
        assert_eq!(
            next_state(est, PROTO_TCP, TCP_ACK | TCP_FIN),
            SEEN_NON_SYN | CLOSING
        );
        assert_eq!(next_state(0, PROTO_TCP, TCP_RST), SEEN_NON_SYN | CLOSING);
        assert_eq!(
            next_state(SEEN_NON_SYN | CLOSING, PROTO_TCP, TCP_ACK),
            SEEN_NON_SYN | CLOSING,
            "closing is for good"
        );
        assert_eq!(
            next_state(0, PROTO_UDP, 0xff),
            SEEN_NON_SYN,
            "UDP has no flags"
        );
    }

    #[test]
    fn a_syn_reopens_only_a_closed_tcp_flow() {
        assert!(reopens(CLOSING | SEEN_NON_SYN, PROTO_TCP, TCP_SYN));
        assert!(!reopens(CLOSING, PROTO_TCP, TCP_SYN | TCP_ACK));
        assert!(!reopens(SEEN_NON_SYN, PROTO_TCP, TCP_SYN));
        assert!(!reopens(CLOSING, PROTO_UDP, TCP_SYN));
    }

    #[test]
    fn timeouts_by_protocol_and_state() {
        let c = Config::DEFAULT;
        assert_eq!(timeout_ns(&c, PROTO_TCP, 0), 60 * S);
        assert_eq!(timeout_ns(&c, PROTO_TCP, SEEN_NON_SYN), 6 * 3600 * S);
        assert_eq!(timeout_ns(&c, PROTO_TCP, SEEN_NON_SYN | CLOSING), 10 * S);
        assert_eq!(timeout_ns(&c, PROTO_UDP, CLOSING), 60 * S);
        let e = entry(SEEN_NON_SYN | CLOSING, 100 * S);
        assert!(!expired(&c, PROTO_TCP, &e, 110 * S));
        assert!(expired(&c, PROTO_TCP, &e, 110 * S + 1));
        assert!(
            !expired(&c, PROTO_TCP, &e, 50 * S),
            "refreshed by another CPU"
        );
    }

    #[test]
    fn writes_only_on_state_change_or_refresh() {
        let e = entry(SEEN_NON_SYN, 10 * S);
        assert!(!needs_write(&e, SEEN_NON_SYN, 10 * S + S / 2));
        assert!(needs_write(&e, SEEN_NON_SYN, 11 * S));
        assert!(needs_write(&e, SEEN_NON_SYN | CLOSING, 10 * S));
    }

    #[test]
    fn token_bucket_allows_rate_per_second_and_no_more() {
        let mut b = TokenBucket::default();
        let start = 1000 * S;
        let taken = (0..5000)
            .filter(|_| take_token(&mut b, 1000, start))
            .count();
        assert_eq!(taken, 1000, "a full bucket after a long idle time");
        assert!(
            !take_token(&mut b, 1000, start + S / 2000),
            "half a token is none"
        );
        assert!(take_token(&mut b, 1000, start + S / 1000));
        // Over one more second, spread evenly, 1000 more.
        let taken = (1..=4000)
            .filter(|i| take_token(&mut b, 1000, start + S / 1000 + i * S / 4000))
            .count();
        assert_eq!(taken, 1000);
    }
}
