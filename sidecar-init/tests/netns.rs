//! Real-kernel test: install, reinstall and clean up the rules in a throwaway network namespace.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_sidecar-init");

/// A fresh network namespace, deleted on drop so that a failing assertion leaves nothing behind.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ebbinit-{}-{n}", std::process::id());
        check(&output("ip", &["netns", "add", &name]), "ip netns add");
        Netns(name)
    }

    fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut argv = vec!["netns", "exec", &self.0, program];
        argv.extend(args);
        output("ip", &argv)
    }

    /// Both nat tables, without what changes from one save to the next (timestamps, counters).
    fn nat(&self) -> [String; 2] {
        ["iptables-save", "ip6tables-save"].map(|save| {
            let out = self.exec(save, &["-t", "nat"]);
            check(&out, save);
            let strip = |l: &str| match l.strip_prefix(':') {
                Some(_) => l.rsplit_once(' ').map_or(l, |(head, _)| head).to_owned(),
                None => l.to_owned(),
            };
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines().filter(|l| !l.starts_with('#')).map(|l| strip(l) + "\n").collect()
        })
    }

    fn init(&self, args: &[&str]) {
        check(&self.exec(BIN, args), &format!("sidecar-init {args:?}"));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (install iptables and iproute2)"))
}

fn check(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed ({}): {stderr}", out.status);
}

/// Fails rather than skips: CI provides root and the tools, and a skipped test proves nothing.
fn require_root_and_tools() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().nth(1));
    assert_eq!(euid, Some("0"), "this test must run as root (it creates a network namespace)");
    for (tool, arg) in [("ip", "-V"), ("iptables-restore", "--version"), ("ip6tables-restore", "--version")] {
        check(&output(tool, &[arg]), tool);
    }
}

#[test]
fn installs_reinstalls_and_cleans_up_in_a_fresh_netns() {
    require_root_and_tools();
    let ns = Netns::new();
    // Someone else's rules, which every step must leave alone.
    for rule in ["-N OTHER", "-A PREROUTING -p udp -j OTHER", "-A OUTPUT -p tcp --dport 9 -j RETURN"] {
        for iptables in ["iptables", "ip6tables"] {
            let args: Vec<&str> = ["-t", "nat"].into_iter().chain(rule.split_whitespace()).collect();
            check(&ns.exec(iptables, &args), rule);
        }
    }
    let before = ns.nat();

    ns.init(&["--ipv6"]);
    let installed = ns.nat();
    let jumps = [
        "-A PREROUTING -p tcp -m comment --comment \"ebb: inbound TCP to the proxy\" -j EBB_INBOUND\n",
        "-A OUTPUT -p tcp -m comment --comment \"ebb: outbound TCP to the proxy\" -j EBB_OUTPUT\n",
    ];
    for (nat, loopback) in installed.iter().zip(["-d 127.0.0.1/32 ", "-d ::1/128 "]) {
        for chain in ["EBB_INBOUND", "EBB_IN_REDIRECT", "EBB_OUTPUT", "EBB_REDIRECT"] {
            assert!(nat.contains(&format!(":{chain} -\n")), "{chain} missing:\n{nat}");
        }
        for jump in jumps {
            assert_eq!(nat.matches(jump).count(), 1, "{jump} not there once:\n{nat}");
        }
        assert!(nat.contains(loopback), "{loopback}missing:\n{nat}");
        assert!(nat.contains("-A PREROUTING -p udp -j OTHER\n"), "foreign rule lost:\n{nat}");
    }

    ns.init(&["--ipv6"]);
    assert_eq!(ns.nat(), installed, "a rerun changed the rules");
    ns.init(&["--ipv6", "--cleanup"]);
    assert_eq!(ns.nat(), before, "cleanup did not restore the table");
    ns.init(&["--ipv6", "--cleanup"]);
    assert_eq!(ns.nat(), before, "a cleanup of a clean table changed it");
}
