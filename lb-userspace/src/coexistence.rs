//! kube-proxy's rules on this node: with them in place, kube-proxy and this datapath would both
//! act on Service traffic. The agent warns at start; it does not remove them (that is the
//! operator's step, in the README).
use std::process::Command;

/// The chain every kube-proxy iptables ruleset has in its nat table.
const IPTABLES_CHAIN: &str = ":KUBE-SERVICES ";
/// The table kube-proxy's nftables mode creates.
const NFT_TABLE: &str = "kube-proxy";

/// Where kube-proxy's rules were found: `iptables-save` output (legacy or nft back end) and
/// `nft list tables` output, in the order read.
pub fn traces(iptables_saves: &[(&str, String)], nft_tables: Option<&str>) -> Vec<String> {
    let mut found: Vec<String> = iptables_saves
        .iter()
        .filter(|(_, out)| out.lines().any(|l| l.starts_with(IPTABLES_CHAIN)))
        .map(|(tool, _)| format!("KUBE-SERVICES chain ({tool})"))
        .collect();
    if let Some(tables) = nft_tables
        && tables
            .lines()
            .any(|l| l.split_whitespace().last() == Some(NFT_TABLE))
    {
        found.push(format!("nftables table {NFT_TABLE}"));
    }
    found
}

/// Looks for kube-proxy's rules with the tools present on this node; tools that are missing
/// or fail count as finding nothing.
pub fn find_kube_proxy_rules() -> Vec<String> {
    let output = |program: &str, args: &[&str]| -> Option<String> {
        let out = Command::new(program).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let saves: Vec<(&str, String)> = ["iptables-legacy-save", "iptables-nft-save"]
        .into_iter()
        .filter_map(|tool| Some((tool, output(tool, &["-t", "nat"])?)))
        .collect();
    let tables = output("nft", &["list", "tables"]);
    traces(&saves, tables.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_iptables_chain_and_the_nftables_table() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n";
        let found = traces(
            &[("iptables-nft-save", save.to_string())],
            Some("table ip filter\ntable ip kube-proxy\n"),
        );
        assert_eq!(
            found,
            [
                "KUBE-SERVICES chain (iptables-nft-save)",
                "nftables table kube-proxy"
            ]
        );
    }

    #[test]
    fn other_rules_are_not_kube_proxys() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j KUBE-SERVICES-LIKE\n";
        assert!(
            traces(
                &[("iptables-legacy-save", save.to_string())],
                Some("table inet kube-proxy-old\n")
            )
            .is_empty()
        );
    }
}
