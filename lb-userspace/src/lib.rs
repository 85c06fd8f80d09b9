//! The load balancer's agent and CLI, as a library so tests and benchmarks drive the same code.
pub mod agent;
pub mod api;
pub mod batch;
pub mod coexistence;
pub mod controlplane;
pub mod dataplane;
pub mod desired;
pub mod diff;
pub mod dns;
pub mod events;
pub mod external;
pub mod health_check;
pub mod model;
pub mod sources;
pub mod stale_sockets;
pub mod tick;
pub mod views;

/// A small deterministic random sequence (xorshift64) for the randomized unit tests.
#[cfg(test)]
pub(crate) fn test_random(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
