//! Running commands with their command line shown in errors.
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, bail};

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, failing with its stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `cmd` with inherited stdout/stderr, failing if it exits non-zero.
pub fn run_visible(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

pub fn sh(line: &str) -> anyhow::Result<Output> {
    let mut parts = line.split_whitespace();
    let program = parts.next().context("empty command")?;
    run(Command::new(program).args(parts))
}

/// Passed and failed counts of a libtest summary line
/// (`test result: ok. 6 passed; 0 failed; 0 ignored; ...`).
pub fn test_result_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';').find_map(|part| {
            let mut tokens = part.split_whitespace().rev();
            (tokens.next() == Some(word))
                .then(|| tokens.next()?.parse::<u64>().ok())
                .flatten()
        })
    };
    Some((count("passed")?, count("failed")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summary_lines() {
        let ok = "test result: ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s";
        assert_eq!(test_result_counts(ok), Some((6, 0)));
        let bad = "test result: FAILED. 26 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.07s";
        assert_eq!(test_result_counts(bad), Some((26, 2)));
        assert_eq!(test_result_counts("test foo ... ok"), None);
    }
}
