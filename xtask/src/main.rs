use std::{path::PathBuf, process::Command};

use clap::{Parser, Subcommand};
use xtask::{cmd::run_visible, testbed};

mod demo;
mod report;
mod setup;

/// Build, demo, test and benchmark the load balancer.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, nightly rust-src, bpf-linker; mount bpffs.
    Setup,
    /// Build the `lb` binary (with the eBPF programs inside) in release mode.
    Build,
    /// Walk through the Kubernetes Services scenario on a simulated node.
    Demo,
    /// Run every test: lints, unit tests, BPF_PROG_TEST_RUN tables, namespace tests.
    Test,
    /// Write BENCHMARKS.md and its charts from the last measurements in target/bench.
    Report,
    /// Per-packet cost of the datapath with BPF_PROG_TEST_RUN; with --report also the
    /// control plane and the side-by-side comparison with kube-proxy, written to BENCHMARKS.md.
    Bench {
        #[arg(long)]
        report: bool,
    },
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("==> cargo {}", args.join(" "));
    run_visible(
        Command::new(env!("CARGO"))
            .args(args)
            .current_dir(workspace_root()),
    )
}

/// `cargo test` of every crate but the eBPF one, every test binary run even after one fails
/// (so the count covers them all). The same selection each time, so nothing is built twice.
const TEST_ARGS: [&str; 6] = [
    "test",
    "--release",
    "--workspace",
    "--exclude",
    "lb-ebpf",
    "--no-fail-fast",
];

/// Runs cargo test with [`TEST_ARGS`], `extra` arguments and `env`, echoing its output, and
/// adds up its `test result:` lines.
fn cargo_test(extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let args: Vec<&str> = TEST_ARGS.iter().chain(extra).copied().collect();
    let env_shown: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    eprintln!("==> {}cargo {}", env_shown.concat(), args.join(" "));
    let mut child = Command::new(env!("CARGO"))
        .args(&args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = xtask::cmd::test_result_counts(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        failed += 1;
    }
    Ok((passed, failed))
}

/// Test binaries that run agents in network namespaces (run once per TC attach mode).
const NAMESPACE_TESTS: [&str; 6] = [
    "netns",
    "reliability",
    "multinode",
    "cluster_mode",
    "selection",
    "external",
];

pub fn build() -> anyhow::Result<PathBuf> {
    cargo(&["build", "--release", "-p", "lb-userspace"])?;
    Ok(workspace_root().join("target/release/lb"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            let lb = build()?;
            eprintln!("==> built {}", lb.display());
            Ok(())
        }
        Task::Demo => {
            setup::setup()?;
            let lb = build()?;
            demo::run(&lb)
        }
        Task::Test => {
            setup::setup()?;
            let left = testbed::cleanup_leftovers("lbt")?;
            if left > 0 {
                eprintln!("==> removed {left} leftovers of earlier runs");
            }
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&[
                "clippy",
                "--release",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            // Namespace tests time real connections: one test at a time keeps them honest.
            let result = cargo_test(&["--", "--test-threads=1"], &[]);
            testbed::cleanup_leftovers("lbt")?;
            let (mut passed, mut failed) = result?;
            // The namespace tests again, with the programs attached through the clsact qdisc
            // (the path of kernels before 6.6) instead of TCX.
            let mut args = Vec::new();
            for test in NAMESPACE_TESTS {
                args.extend(["--test", test]);
            }
            args.extend(["--", "--test-threads=1"]);
            let legacy = cargo_test(&args, &[("LB_TEST_TC_ATTACH", "legacy")]);
            testbed::cleanup_leftovers("lbt")?;
            let (p, f) = legacy?;
            passed += p;
            failed += f;
            // Traffic from outside once more in each other XDP mode (native above).
            for mode in ["generic", "off"] {
                let args = ["--test", "external", "--", "--test-threads=1"];
                let run = cargo_test(&args, &[("LB_TEST_XDP_MODE", mode)]);
                testbed::cleanup_leftovers("lbt")?;
                let (p, f) = run?;
                passed += p;
                failed += f;
            }
            println!("{passed} passed, {failed} failed");
            anyhow::ensure!(failed == 0 && passed > 0, "tests failed");
            Ok(())
        }
        Task::Report => report::write(&workspace_root()),
        Task::Bench { report } => {
            setup::setup()?;
            testbed::cleanup_leftovers("lbbench")?;
            cargo(&["bench", "-p", "lb-userspace", "--bench", "datapath"])?;
            if report {
                cargo(&["bench", "-p", "lb-userspace", "--bench", "controlplane"])?;
                cargo(&["bench", "-p", "lb-userspace", "--bench", "cluster_mode"])?;
                cargo(&["bench", "-p", "lb-userspace", "--bench", "kube_proxy"])?;
                cargo(&["bench", "-p", "lb-userspace", "--bench", "nodeport"])?;
                cargo(&["bench", "-p", "lb-userspace", "--bench", "dns"])?;
                report::write(&workspace_root())?;
                eprintln!("==> wrote BENCHMARKS.md and lb-userspace/benches/charts/");
            }
            Ok(())
        }
    }
}
