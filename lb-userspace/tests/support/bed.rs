//! Testbeds of the namespace tests, running the `lb` binary this test build made.
#![allow(dead_code)]

use std::path::Path;

use xtask::testbed::Testbed;

pub fn lb() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb"))
}

/// `nodes` simulated nodes (joined by a LAN when more than one).
pub fn testbed(nodes: usize) -> Testbed {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "namespace tests need root (run `cargo xtask test`)"
    );
    Testbed::with_nodes("lbt", lb(), nodes).expect("testbed")
}
