//! A datapath with fresh, unpinned maps, programmed through the agent's own desired/diff/write
//! path, and run with BPF_PROG_TEST_RUN.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun, TestRunOptions};
use lb::{
    dataplane::{Dataplane, TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM},
    desired::{Algorithm, Backends, DesiredDataplane, Frontend},
    diff::{self, ActualDataplane},
    model::Protocol,
};

pub struct TestDatapath {
    pub dp: Dataplane,
    pub actual: ActualDataplane,
    /// How the frontends programmed next pick their backends.
    pub algorithm: Algorithm,
}

pub struct Output {
    pub action: u32,
    pub frame: Vec<u8>,
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "BPF_PROG_TEST_RUN tests need root (run `cargo xtask test`)"
    );
}

impl TestDatapath {
    pub fn new() -> Self {
        require_root();
        Self {
            dp: Dataplane::load_unpinned().expect("load eBPF object"),
            actual: ActualDataplane::default(),
            algorithm: Algorithm::Random,
        }
    }

    /// Programs frontends whose backends all take new flows.
    pub fn program(&mut self, frontends: &[(Frontend, Vec<SocketAddrV4>)]) {
        let with_states: Vec<_> = frontends
            .iter()
            .map(|(f, b)| (*f, Backends::serving(b.clone())))
            .collect();
        self.program_backends(&with_states);
    }

    pub fn program_backends(&mut self, frontends: &[(Frontend, Backends)]) {
        let desired = DesiredDataplane {
            frontends: frontends.iter().cloned().collect(),
            algorithm: self.algorithm,
        };
        let plan = diff::diff(&desired, &self.actual);
        assert!(plan.skipped.is_empty(), "capacity: {:?}", plan.skipped);
        let ops = plan.ops();
        self.dp.write(&ops).expect("write maps");
        diff::apply(&mut self.actual, &ops);
    }

    /// Runs the program that sees packets entering the node (a pod's requests).
    pub fn run(&mut self, frame: &[u8]) -> Output {
        self.run_program(TC_INGRESS_PROGRAM, frame)
    }

    /// Runs the program that sees packets leaving toward a pod (a backend's replies).
    pub fn run_egress(&mut self, frame: &[u8]) -> Output {
        self.run_program(TC_EGRESS_PROGRAM, frame)
    }

    pub fn run_program(&mut self, name: &'static str, frame: &[u8]) -> Output {
        let mut out = vec![0u8; frame.len().max(128) + 256];
        let prog = self.dp.classifier(name).expect("program");
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        Output {
            action: result.return_value,
            frame: out,
        }
    }

    pub fn counter(&self, name: &str) -> u64 {
        let i = lb_common::stats::COUNTER_NAMES
            .iter()
            .position(|n| *n == name)
            .expect("counter name");
        self.dp.stats().expect("stats")[i]
    }
}

pub fn tcp_frontend(ip: Ipv4Addr, port: u16) -> Frontend {
    Frontend::cluster(ip, port, Protocol::Tcp)
}

pub fn udp_frontend(ip: Ipv4Addr, port: u16) -> Frontend {
    Frontend::cluster(ip, port, Protocol::Udp)
}
