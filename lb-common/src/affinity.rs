//! ClientIP session affinity: how long a client stays with the endpoint it was given.
use crate::{Affinity, Frontend};

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not given (3 hours), and its bound.
pub const DEFAULT_TIMEOUT_S: u32 = 10_800;
pub const MAX_TIMEOUT_S: u32 = 86_400;

/// A client's entry still holds at `now_ns` if its last new flow was at most the frontend's
/// timeout ago. `now_ns` may lag an entry another CPU just wrote: that counts as holding.
#[inline(always)]
pub fn holds(frontend: &Frontend, entry: &Affinity, now_ns: u64) -> bool {
    now_ns.saturating_sub(entry.last_used_ns) <= frontend.affinity_timeout_s as u64 * 1_000_000_000
}

/// Whether new flows to the frontend keep a client with one endpoint.
#[inline(always)]
pub fn enabled(frontend: &Frontend) -> bool {
    frontend.flags & crate::FRONTEND_AFFINITY != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FRONTEND_AFFINITY;

    const S: u64 = 1_000_000_000;

    fn frontend(timeout_s: u32) -> Frontend {
        Frontend {
            flags: FRONTEND_AFFINITY,
            affinity_timeout_s: timeout_s,
            ..Frontend::default()
        }
    }

    #[test]
    fn an_entry_holds_for_the_timeout_after_its_last_use() {
        let entry = Affinity {
            backend_id: 3,
            _pad: 0,
            last_used_ns: 100 * S,
        };
        let f = frontend(10);
        assert!(holds(&f, &entry, 100 * S));
        assert!(holds(&f, &entry, 110 * S));
        assert!(!holds(&f, &entry, 110 * S + 1));
        // Written a moment ago by another CPU, with a later clock.
        assert!(holds(&f, &entry, 99 * S));
        // The longest timeout does not overflow.
        let f = frontend(MAX_TIMEOUT_S);
        assert!(holds(&f, &entry, 100 * S + MAX_TIMEOUT_S as u64 * S));
        assert!(!holds(&f, &entry, 101 * S + MAX_TIMEOUT_S as u64 * S));
    }

    #[test]
    fn a_shorter_timeout_applies_at_once() {
        let entry = Affinity {
            backend_id: 3,
            _pad: 0,
            last_used_ns: 0,
        };
        assert!(holds(&frontend(DEFAULT_TIMEOUT_S), &entry, 60 * S));
        assert!(!holds(&frontend(2), &entry, 60 * S));
        assert!(enabled(&frontend(2)));
        assert!(!enabled(&Frontend::default()));
    }
}
