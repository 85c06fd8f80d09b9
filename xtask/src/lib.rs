//! Test hosts in network namespaces, shared by `cargo xtask demo`, `cargo xtask bench` and the
//! namespace tests. Holds no logic the load balancer needs at run time.
pub mod cmd;
pub mod kubeproxy;
pub mod machine;
pub mod testbed;
pub mod wrk;
