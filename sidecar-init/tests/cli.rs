//! Exit codes, error messages and dry runs, with stand-ins for the iptables binaries.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sidecar-init");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).envs(env.iter().copied());
    cmd.output().unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

/// Asserts the exit code and that stderr mentions `needle`.
fn expect_failure(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!((out.status.code(), err.contains(needle)), (Some(code), true), "{err}");
}

/// Writes an executable shell script standing in for iptables-restore.
fn script(name: &str, body: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("{name}-{}", std::process::id()));
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn bad_values_exit_64_naming_the_flag() {
    let out = run(&["--outbound-ports", "80,99999"], &[]);
    expect_failure(&out, 64, "--outbound-ports");
    let out = run(&[], &[("EBB_INIT_EXCLUDE_OUTBOUND_CIDRS", "10.0.0.0/8,nope")]);
    expect_failure(&out, 64, "--exclude-outbound-cidrs");
}

#[test]
fn missing_or_refusing_iptables_exits_1_saying_why() {
    let out = run(&["--iptables-save", "/nonexistent/iptables-save"], &[]);
    expect_failure(&out, 1, "reading the IPv4 nat table: cannot run /nonexistent/iptables-save");

    let refuse = script("refuse", "cat >/dev/null; echo 'Error occurred at line: 7' >&2; exit 2");
    let out = run(&["--iptables-save", "true", "--iptables-restore", refuse.to_str().unwrap()], &[]);
    expect_failure(&out, 1, "exit status: 2): Error occurred at line: 7");
    expect_failure(&out, 1, "applying the IPv4 rules: ");
}

#[test]
fn dry_run_applies_nothing_and_previews_without_iptables_save() {
    let args = ["--dry-run", "--iptables-save", "/nonexistent/save", "--iptables-restore", "false"];
    let out = run(&args, &[("EBB_INIT_INBOUND_PORTS", "8080")]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stderr.contains("showing the input for an empty nat table"), "{stderr}");
    assert!(stdout.starts_with("# false --noflush\n*nat\n"), "{stdout}");
    assert!(stdout.contains("--dport 8080 -m comment --comment \"ebb: capture inbound port 8080\""), "{stdout}");
}
