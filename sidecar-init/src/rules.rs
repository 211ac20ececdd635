//! Pure rendering of the `iptables-restore` inputs that install or remove the redirect rules.

use std::net::IpAddr;

use crate::config::{Cidr, Config, Scope, PROXY_OWN_PORTS};

/// Chain that decides which inbound connections are captured.
const INBOUND: &str = "EBB_INBOUND";
/// Chain that redirects captured inbound connections to the proxy.
const IN_REDIRECT: &str = "EBB_IN_REDIRECT";
/// Chain that decides which outbound connections are captured.
const OUTPUT: &str = "EBB_OUTPUT";
/// Chain that redirects captured outbound connections to the proxy.
const REDIRECT: &str = "EBB_REDIRECT";
/// All chains sidecar-init owns; nothing outside them is ever touched except the jumps into them.
const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];

/// IP family, since IPv4 and IPv6 rules live in separate tables and tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn holds(self, cidr: &Cidr) -> bool {
        matches!((self, cidr.addr), (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)))
    }
}

/// Accumulates the lines of one `*nat` restore input.
struct Input(String);

impl Input {
    fn new() -> Self {
        Input("*nat\n".to_owned())
    }

    fn line(&mut self, line: &str) {
        self.0.push_str(line);
        self.0.push('\n');
    }

    /// Appends a rule; the comment lets an operator tell our rules apart in `iptables-save`.
    fn rule(&mut self, chain: &str, matches: &str, comment: &str, target: &str) {
        let sep = if matches.is_empty() { "" } else { " " };
        let comment = format!("-m comment --comment \"ebb: {comment}\"");
        self.line(&format!("-A {chain} {matches}{sep}{comment} -j {target}"));
    }

    fn finish(mut self) -> String {
        self.line("COMMIT");
        self.0
    }
}

/// Renders the input that (re)installs all rules, given the current `iptables-save -t nat`.
///
/// Declaring our chains flushes them, and existing jumps into them are deleted before being
/// re-added, so applying this with `--noflush` any number of times yields the same table.
pub fn render(cfg: &Config, family: Family, saved: &str) -> String {
    let mut out = Input::new();
    for chain in CHAINS {
        out.line(&format!(":{chain} - [0:0]"));
    }
    for jump in jumps_into_own_chains(saved) {
        out.line(&format!("-D {jump}"));
    }

    let mut excluded = PROXY_OWN_PORTS.to_vec();
    for port in &cfg.exclude_inbound_ports.0 {
        if !excluded.contains(port) {
            excluded.push(*port);
        }
    }
    for port in excluded {
        let (dport, why) = (dport(port), format!("inbound port {port} not captured"));
        out.rule(INBOUND, &dport, &why, "RETURN");
    }
    match &cfg.inbound_ports {
        Scope::All => out.rule(INBOUND, "-p tcp", "capture inbound", IN_REDIRECT),
        Scope::Only(ports) => {
            for &port in ports {
                let (dport, why) = (dport(port), format!("capture inbound port {port}"));
                out.rule(INBOUND, &dport, &why, IN_REDIRECT);
            }
        }
    }
    let to = format!("REDIRECT --to-ports {}", cfg.inbound_port);
    out.rule(IN_REDIRECT, "-p tcp", "to the proxy inbound listener", &to);

    // The proxy's own connections must escape capture, or they would loop back into it.
    let uid = format!("-m owner --uid-owner {}", cfg.proxy_uid);
    out.rule(OUTPUT, &uid, "proxy uid not captured", "RETURN");
    let gid = format!("-m owner --gid-owner {}", cfg.proxy_gid);
    out.rule(OUTPUT, &gid, "proxy gid not captured", "RETURN");
    let loopback = format!("-d {}", family.loopback());
    out.rule(OUTPUT, &loopback, "loopback not captured", "RETURN");
    // The app talking to itself (e.g. to its own pod IP) is routed over lo and never leaves the pod.
    let why = "app to itself over lo not captured";
    out.rule(OUTPUT, "-o lo", why, "RETURN");
    for &port in &cfg.exclude_outbound_ports.0 {
        let (dport, why) = (dport(port), format!("outbound port {port} not captured"));
        out.rule(OUTPUT, &dport, &why, "RETURN");
    }
    let excluded_cidrs = cfg.exclude_outbound_cidrs.0.iter();
    for cidr in excluded_cidrs.filter(|c| family.holds(c)) {
        let why = format!("outbound to {cidr} not captured");
        out.rule(OUTPUT, &format!("-d {cidr}"), &why, "RETURN");
    }
    // One rule per (CIDR, port) pair: iptables has no "any of these CIDRs and any of these ports".
    let cidrs: Vec<Option<&Cidr>> = match &cfg.outbound_cidrs {
        Scope::All => vec![None],
        Scope::Only(cidrs) => cidrs.iter().filter(|c| family.holds(c)).map(Some).collect(),
    };
    let ports: Vec<Option<u16>> = match &cfg.outbound_ports {
        Scope::All => vec![None],
        Scope::Only(ports) => ports.iter().copied().map(Some).collect(),
    };
    for cidr in &cidrs {
        for port in &ports {
            let (mut matches, mut why) = (String::new(), String::from("capture outbound"));
            if let Some(cidr) = cidr {
                matches.push_str(&format!("-d {cidr} "));
                why.push_str(&format!(" to {cidr}"));
            }
            matches.push_str("-p tcp");
            if let Some(port) = port {
                matches.push_str(&format!(" --dport {port}"));
                why.push_str(&format!(" port {port}"));
            }
            out.rule(OUTPUT, &matches, &why, REDIRECT);
        }
    }
    let to = format!("REDIRECT --to-ports {}", cfg.outbound_port);
    out.rule(REDIRECT, "-p tcp", "to the proxy outbound listener", &to);

    // Appended after the `-D`s above, so a rerun leaves exactly one of each.
    out.rule("PREROUTING", "-p tcp", "inbound TCP to the proxy", INBOUND);
    out.rule("OUTPUT", "-p tcp", "outbound TCP to the proxy", OUTPUT);
    out.finish()
}

/// Match on a TCP destination port.
fn dport(port: u16) -> String {
    format!("-p tcp --dport {port}")
}

/// Renders the input that removes our jumps and chains, given the current `iptables-save -t nat`.
///
/// Only what `saved` shows to exist is removed, because `-D`, `-F` and `-X` of something absent
/// would make iptables-restore reject the whole input.
pub fn cleanup(saved: &str) -> String {
    let mut out = Input::new();
    for jump in jumps_into_own_chains(saved) {
        out.line(&format!("-D {jump}"));
    }
    let existing: Vec<&str> = nat_lines(saved)
        .filter_map(|line| line.strip_prefix(':')?.split_whitespace().next())
        .filter(|chain| CHAINS.contains(chain))
        .collect();
    // Flush all before deleting any: our chains jump into each other.
    for chain in &existing {
        out.line(&format!("-F {chain}"));
    }
    for chain in &existing {
        out.line(&format!("-X {chain}"));
    }
    out.finish()
}

/// Lines of the `*nat` table in `iptables-save` output.
fn nat_lines(saved: &str) -> impl Iterator<Item = &str> {
    let mut in_nat = false;
    saved.lines().map(str::trim).filter(move |line| {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
        }
        in_nat
    })
}

/// Rules (chain and spec, as saved) of other chains that jump into ours; saved text deletes them
/// exactly, whatever shape an older version of sidecar-init or an operator gave them.
fn jumps_into_own_chains(saved: &str) -> impl Iterator<Item = &str> {
    nat_lines(saved).filter_map(|line| {
        let rule = line.strip_prefix("-A ")?;
        let chain = rule.split_whitespace().next()?;
        let target = rule.rsplit_once(" -j ")?.1;
        (!CHAINS.contains(&chain) && CHAINS.contains(&target)).then_some(rule)
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &str) -> Config {
        let argv = std::iter::once("sidecar-init").chain(args.split_whitespace());
        Config::try_parse_from(argv).unwrap_or_else(|e| panic!("{args}: {e}"))
    }

    /// The rendered rules of the chains `expected` shows, so each case spells out only its change.
    fn rules_of_chains_in(input: &str, expected: &str) -> String {
        let chain = |l: &str| l.split_whitespace().nth(1).map(str::to_owned);
        let chains: Vec<String> = expected.lines().filter_map(chain).collect();
        let wanted = |l: &&str| l.starts_with("-A ") && chain(l).is_some_and(|c| chains.contains(&c));
        input.lines().filter(wanted).map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn defaults() {
        let expected = r#"*nat
:EBB_INBOUND - [0:0]
:EBB_IN_REDIRECT - [0:0]
:EBB_OUTPUT - [0:0]
:EBB_REDIRECT - [0:0]
-A EBB_INBOUND -p tcp --dport 15000 -m comment --comment "ebb: inbound port 15000 not captured" -j RETURN
-A EBB_INBOUND -p tcp --dport 15020 -m comment --comment "ebb: inbound port 15020 not captured" -j RETURN
-A EBB_INBOUND -p tcp --dport 15021 -m comment --comment "ebb: inbound port 15021 not captured" -j RETURN
-A EBB_INBOUND -p tcp -m comment --comment "ebb: capture inbound" -j EBB_IN_REDIRECT
-A EBB_IN_REDIRECT -p tcp -m comment --comment "ebb: to the proxy inbound listener" -j REDIRECT --to-ports 15006
-A EBB_OUTPUT -m owner --uid-owner 1337 -m comment --comment "ebb: proxy uid not captured" -j RETURN
-A EBB_OUTPUT -m owner --gid-owner 1337 -m comment --comment "ebb: proxy gid not captured" -j RETURN
-A EBB_OUTPUT -d 127.0.0.1/32 -m comment --comment "ebb: loopback not captured" -j RETURN
-A EBB_OUTPUT -o lo -m comment --comment "ebb: app to itself over lo not captured" -j RETURN
-A EBB_OUTPUT -p tcp -m comment --comment "ebb: capture outbound" -j EBB_REDIRECT
-A EBB_REDIRECT -p tcp -m comment --comment "ebb: to the proxy outbound listener" -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -m comment --comment "ebb: inbound TCP to the proxy" -j EBB_INBOUND
-A OUTPUT -p tcp -m comment --comment "ebb: outbound TCP to the proxy" -j EBB_OUTPUT
COMMIT
"#;
        assert_eq!(render(&config(""), Family::V4, ""), expected);
    }

    #[test]
    fn chains_by_flags() {
        let cases = [
            ("--inbound-ports 8080,9090", Family::V4, r#"-A EBB_INBOUND -p tcp --dport 15000 -m comment --comment "ebb: inbound port 15000 not captured" -j RETURN
-A EBB_INBOUND -p tcp --dport 15020 -m comment --comment "ebb: inbound port 15020 not captured" -j RETURN
-A EBB_INBOUND -p tcp --dport 15021 -m comment --comment "ebb: inbound port 15021 not captured" -j RETURN
-A EBB_INBOUND -p tcp --dport 8080 -m comment --comment "ebb: capture inbound port 8080" -j EBB_IN_REDIRECT
-A EBB_INBOUND -p tcp --dport 9090 -m comment --comment "ebb: capture inbound port 9090" -j EBB_IN_REDIRECT
"#),
            ("--exclude-inbound-ports 22,15020", Family::V4, r#"-A EBB_INBOUND -p tcp --dport 15000 -m comment --comment "ebb: inbound port 15000 not captured" -j RETURN
-A EBB_INBOUND -p tcp --dport 15020 -m comment --comment "ebb: inbound port 15020 not captured" -j RETURN
-A EBB_INBOUND -p tcp --dport 15021 -m comment --comment "ebb: inbound port 15021 not captured" -j RETURN
-A EBB_INBOUND -p tcp --dport 22 -m comment --comment "ebb: inbound port 22 not captured" -j RETURN
-A EBB_INBOUND -p tcp -m comment --comment "ebb: capture inbound" -j EBB_IN_REDIRECT
"#),
            ("--inbound-port 7000 --outbound-port 7001", Family::V6, r#"-A EBB_IN_REDIRECT -p tcp -m comment --comment "ebb: to the proxy inbound listener" -j REDIRECT --to-ports 7000
-A EBB_REDIRECT -p tcp -m comment --comment "ebb: to the proxy outbound listener" -j REDIRECT --to-ports 7001
"#),
            ("--exclude-outbound-ports 5432 --exclude-outbound-cidrs 10.96.0.1/12,fd00::/8 --proxy-uid 101 --proxy-gid 102", Family::V4, r#"-A EBB_OUTPUT -m owner --uid-owner 101 -m comment --comment "ebb: proxy uid not captured" -j RETURN
-A EBB_OUTPUT -m owner --gid-owner 102 -m comment --comment "ebb: proxy gid not captured" -j RETURN
-A EBB_OUTPUT -d 127.0.0.1/32 -m comment --comment "ebb: loopback not captured" -j RETURN
-A EBB_OUTPUT -o lo -m comment --comment "ebb: app to itself over lo not captured" -j RETURN
-A EBB_OUTPUT -p tcp --dport 5432 -m comment --comment "ebb: outbound port 5432 not captured" -j RETURN
-A EBB_OUTPUT -d 10.96.0.0/12 -m comment --comment "ebb: outbound to 10.96.0.0/12 not captured" -j RETURN
-A EBB_OUTPUT -p tcp -m comment --comment "ebb: capture outbound" -j EBB_REDIRECT
"#),
            ("--outbound-cidrs 10.0.0.0/8,192.168.1.7 --outbound-ports 80,443", Family::V4, r#"-A EBB_OUTPUT -m owner --uid-owner 1337 -m comment --comment "ebb: proxy uid not captured" -j RETURN
-A EBB_OUTPUT -m owner --gid-owner 1337 -m comment --comment "ebb: proxy gid not captured" -j RETURN
-A EBB_OUTPUT -d 127.0.0.1/32 -m comment --comment "ebb: loopback not captured" -j RETURN
-A EBB_OUTPUT -o lo -m comment --comment "ebb: app to itself over lo not captured" -j RETURN
-A EBB_OUTPUT -d 10.0.0.0/8 -p tcp --dport 80 -m comment --comment "ebb: capture outbound to 10.0.0.0/8 port 80" -j EBB_REDIRECT
-A EBB_OUTPUT -d 10.0.0.0/8 -p tcp --dport 443 -m comment --comment "ebb: capture outbound to 10.0.0.0/8 port 443" -j EBB_REDIRECT
-A EBB_OUTPUT -d 192.168.1.7/32 -p tcp --dport 80 -m comment --comment "ebb: capture outbound to 192.168.1.7/32 port 80" -j EBB_REDIRECT
-A EBB_OUTPUT -d 192.168.1.7/32 -p tcp --dport 443 -m comment --comment "ebb: capture outbound to 192.168.1.7/32 port 443" -j EBB_REDIRECT
"#),
            ("--outbound-cidrs 10.0.0.0/8,2001:db8::1/32 --exclude-outbound-cidrs 10.1.0.0/16,2001:db8:1::/48", Family::V6, r#"-A EBB_OUTPUT -m owner --uid-owner 1337 -m comment --comment "ebb: proxy uid not captured" -j RETURN
-A EBB_OUTPUT -m owner --gid-owner 1337 -m comment --comment "ebb: proxy gid not captured" -j RETURN
-A EBB_OUTPUT -d ::1/128 -m comment --comment "ebb: loopback not captured" -j RETURN
-A EBB_OUTPUT -o lo -m comment --comment "ebb: app to itself over lo not captured" -j RETURN
-A EBB_OUTPUT -d 2001:db8:1::/48 -m comment --comment "ebb: outbound to 2001:db8:1::/48 not captured" -j RETURN
-A EBB_OUTPUT -d 2001:db8::/32 -p tcp -m comment --comment "ebb: capture outbound to 2001:db8::/32" -j EBB_REDIRECT
"#),
        ];
        for (args, family, expected) in cases {
            let input = render(&config(args), family, "");
            assert_eq!(rules_of_chains_in(&input, expected), expected, "{args} ({family:?})");
        }
    }

    /// `iptables-save -t nat` after a run, with someone else's rules that must be left alone.
    const SAVED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Tue Nov 24 18:14:32 2026
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:EBB_INBOUND - [0:0]
:EBB_IN_REDIRECT - [0:0]
:EBB_OUTPUT - [0:0]
:EBB_REDIRECT - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -m comment --comment "ebb: inbound TCP to the proxy" -j EBB_INBOUND
-A PREROUTING -j OTHER
-A OUTPUT -p tcp -m comment --comment "ebb: outbound TCP to the proxy" -j EBB_OUTPUT
-A EBB_INBOUND -p tcp -m comment --comment "ebb: capture inbound" -j EBB_IN_REDIRECT
-A EBB_OUTPUT -p tcp -m comment --comment "ebb: capture outbound" -j EBB_REDIRECT
-A OTHER -p udp -j RETURN
COMMIT
# Completed on Tue Nov 24 18:14:32 2026
"#;

    #[test]
    fn rerun_replaces_existing_jumps() {
        let input = render(&config(""), Family::V4, SAVED);
        let deletes: Vec<&str> = input.lines().filter(|l| l.starts_with("-D ")).collect();
        assert_eq!(
            deletes,
            [
                r#"-D PREROUTING -p tcp -m comment --comment "ebb: inbound TCP to the proxy" -j EBB_INBOUND"#,
                r#"-D OUTPUT -p tcp -m comment --comment "ebb: outbound TCP to the proxy" -j EBB_OUTPUT"#,
            ]
        );
        // Deleting before adding is what keeps reruns from piling up jumps.
        assert!(input.find("-D PREROUTING") < input.find("-A PREROUTING"));
    }

    #[test]
    fn cleanup_removes_only_own_chains() {
        let expected = r#"*nat
-D PREROUTING -p tcp -m comment --comment "ebb: inbound TCP to the proxy" -j EBB_INBOUND
-D OUTPUT -p tcp -m comment --comment "ebb: outbound TCP to the proxy" -j EBB_OUTPUT
-F EBB_INBOUND
-F EBB_IN_REDIRECT
-F EBB_OUTPUT
-F EBB_REDIRECT
-X EBB_INBOUND
-X EBB_IN_REDIRECT
-X EBB_OUTPUT
-X EBB_REDIRECT
COMMIT
"#;
        assert_eq!(cleanup(SAVED), expected);
        assert_eq!(cleanup(""), "*nat\nCOMMIT\n");
        let other_table = SAVED.replace("*nat", "*filter");
        assert_eq!(cleanup(&other_table), "*nat\nCOMMIT\n");
    }
}
