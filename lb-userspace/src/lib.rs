//! The load balancer's agent and CLI, as a library so tests and benchmarks drive the same code.
pub mod agent;
pub mod api;
pub mod controlplane;
pub mod dataplane;
pub mod desired;
pub mod diff;
pub mod model;
pub mod sources;
pub mod views;
