//! What a benchmark's figures depend on besides the code: the CPU, the kernel and the
//! mitigations that make calls and returns dearer (retpolines, return thunks). Every benchmark
//! records it with its figures, and BENCHMARKS.md names it with every table.
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub kernel: String,
    pub mitigations: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let cpu = format!(
            "{} (family {}, model {}), {cpus} CPUs",
            field("model name"),
            field("cpu family"),
            field("model"),
        );
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let vulnerabilities = std::path::Path::new("/sys/devices/system/cpu/vulnerabilities");
        let mitigations = ["spectre_v2", "spec_rstack_overflow", "retbleed"]
            .iter()
            .filter_map(|v| {
                let state = std::fs::read_to_string(vulnerabilities.join(v)).ok()?;
                let state = state.trim();
                (state != "Not affected").then(|| format!("{v}: {state}"))
            })
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            cpu,
            kernel,
            mitigations,
        }
    }

    /// One line for a report.
    pub fn describe(&self) -> String {
        let mitigations = if self.mitigations.is_empty() {
            "no call/return mitigations reported"
        } else {
            &self.mitigations
        };
        format!("{}; Linux {}; {mitigations}", self.cpu, self.kernel)
    }
}
