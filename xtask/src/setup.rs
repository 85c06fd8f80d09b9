//! Installs what building and testing need, if missing, saying what it does.
use std::process::Command;

use anyhow::Context as _;
use xtask::cmd::{run, run_visible};

/// Tools the tests, the demo and the benchmarks use (wrk, iptables, nftables, conntrack,
/// dnsperf, dnsmasq-base and librsvg2-bin only for `cargo xtask bench --report`; python3 runs
/// the socket probe of the connect-time tests).
const DEBIAN_PACKAGES: [&str; 16] = [
    "bpftool",
    "iproute2",
    "ethtool",
    "iputils-ping",
    "curl",
    "socat",
    "tcpdump",
    "dnsutils",
    "wrk",
    "iptables",
    "nftables",
    "conntrack",
    "dnsperf",
    "dnsmasq-base",
    "librsvg2-bin",
    "python3-minimal",
];
const BPF_LINKER_VERSION: &str = "0.10.4";

fn step(message: &str) {
    eprintln!("==> {message}");
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn setup() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("run as root: loading eBPF programs and making network namespaces need it");
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        step("Debian packages present");
    } else {
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run_visible(Command::new("apt-get").args(["update", "-qq"]))?;
        run_visible(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    let toolchains =
        String::from_utf8(run(Command::new("rustup").args(["toolchain", "list"]))?.stdout)?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly Rust toolchain (builds the eBPF programs)");
        run_visible(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = String::from_utf8(
        run(Command::new("rustup").args(["+nightly", "component", "list", "--installed"]))?.stdout,
    )?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src present");
    } else {
        step("adding rust-src to the nightly toolchain");
        run_visible(Command::new("rustup").args(["+nightly", "component", "add", "rust-src"]))?;
    }

    let linker = Command::new("bpf-linker").arg("--version").output();
    let have = linker
        .as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if have.ends_with(BPF_LINKER_VERSION) {
        step(&format!("{have} present"));
    } else {
        step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} (a few minutes the first time)"
        ));
        run_visible(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))
        .context("installing bpf-linker")?;
    }

    let mounted = Command::new("mountpoint")
        .args(["-q", "/sys/fs/bpf"])
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        step("bpffs mounted at /sys/fs/bpf");
    } else {
        step("mounting bpffs at /sys/fs/bpf");
        std::fs::create_dir_all("/sys/fs/bpf")?;
        run_visible(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}
