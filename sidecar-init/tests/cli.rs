//! Exit codes, error messages and the hand-off to iptables-restore, with stand-in binaries.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sidecar-init");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).envs(env.iter().copied());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A directory of this test run's own, so that concurrent runs cannot see each other's files.
fn tmp_dir() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes an executable shell script standing in for iptables-restore.
fn script(name: &str, body: &str) -> PathBuf {
    let path = tmp_dir().join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn bad_values_exit_64_naming_the_flag() {
    let out = run(&["--outbound-ports", "80,99999"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("--outbound-ports"),
        "{}",
        stderr(&out)
    );

    let out = run(
        &[],
        &[("EBB_INIT_EXCLUDE_OUTBOUND_CIDRS", "10.0.0.0/8,nope")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("--exclude-outbound-cidrs"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_or_refusing_iptables_exits_1_saying_why() {
    let out = run(&["--iptables-save", "/nonexistent/iptables-save"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot run /nonexistent/iptables-save"),
        "{}",
        stderr(&out)
    );

    let refuse = script(
        "refuse",
        "cat >/dev/null; echo 'Error occurred at line: 7' >&2; exit 2",
    );
    let refuse = refuse.to_str().unwrap();
    let out = run(
        &["--iptables-save", "true", "--iptables-restore", refuse],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("applying the IPv4 rules") && err.contains("Error occurred at line: 7"),
        "{err}"
    );
}

#[test]
fn applies_one_input_on_stdin_with_noflush() {
    let seen = tmp_dir().join("seen");
    let record = script(
        "record",
        &format!("echo \"$@\" > {0}.args; cat > {0}.input", seen.display()),
    );
    let out = run(
        &["--iptables-save", "true"],
        &[("EBB_INIT_IPTABLES_RESTORE", record.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        fs::read_to_string(seen.with_extension("args")).unwrap(),
        "--noflush\n"
    );
    let input = fs::read_to_string(seen.with_extension("input")).unwrap();
    assert!(
        input.starts_with("*nat\n:EBB_INBOUND - [0:0]\n") && input.ends_with("\nCOMMIT\n"),
        "{input}"
    );
}

#[test]
fn dry_run_applies_nothing_and_previews_without_iptables_save() {
    let args = [
        "--dry-run",
        "--iptables-save",
        "/nonexistent/save",
        "--iptables-restore",
        "false",
    ];
    let out = run(&args, &[("EBB_INIT_INBOUND_PORTS", "8080")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("# false --noflush\n*nat\n"), "{stdout}");
    assert!(
        stdout.contains("--dport 8080 -m comment --comment \"ebb: capture inbound port 8080\""),
        "{stdout}"
    );
    assert!(stderr(&out).contains("empty nat table"), "{}", stderr(&out));
}
