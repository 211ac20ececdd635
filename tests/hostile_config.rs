//! Configurations that used to pass validation and then hurt the process: durations that overflow
//! `Instant` arithmetic (and abort a release build), binds that collide, a response timeout of zero,
//! bad flag values that exit with clap's code instead of the documented 64. Plus property tests:
//! arbitrary documents never panic the parser, and every error names a field.

mod support;

use std::process::Command;
use std::time::Duration;

use ebb::config::{Config, ConfigError, Overrides};
use proptest::prelude::*;
use support::process::{output_within, tempdir::Dir};

/// Far past any sensible bound, yet a valid humantime duration that fits a `Duration`.
const ABSURD: &str = "500000000000y";

/// Every endpoint on an ephemeral loopback port and no capture listener, so a config that wrongly
/// passes validation starts without taking the real ports.
const QUIET: &str = "inbound: { enabled: false }\noutbound: { enabled: false }\n\
admin: { bind: 127.0.0.1:0 }\ntelemetry: { bind: 127.0.0.1:0 }\nhealth: { bind: 127.0.0.1:0 }\n";

fn field_of(err: ConfigError) -> String {
    match err {
        ConfigError::Field { field, .. } => field,
        other => panic!("not a field error: {other}"),
    }
}

fn refused(yaml: &str) -> String {
    match Config::from_yaml(yaml) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => field_of(e),
    }
}

#[test]
fn every_duration_key_at_an_absurd_value_is_refused_naming_it() {
    let listener =
        "listeners:\n  - { name: a, bind: 127.0.0.1:0, target: 127.0.0.1:9, direction: inbound, detect_timeout: X }\n";
    let cases = [
        ("drain: { timeout: X }\n", "drain.timeout"),
        ("drain: { announce: X }\n", "drain.announce"),
        ("drain: { idle_close_window: X }\n", "drain.idle_close_window"),
        ("drain: { linger: X }\n", "drain.linger"),
        ("inbound: { detect_timeout: X }\n", "inbound.detect_timeout"),
        ("outbound: { detect_timeout: X }\n", "outbound.detect_timeout"),
        (listener, "listeners[0].detect_timeout"),
        ("upstream: { connect_timeout: X }\n", "upstream.connect_timeout"),
        ("upstream: { response_timeout: X }\n", "upstream.response_timeout"),
        ("upstream: { idle_timeout: X }\n", "upstream.idle_timeout"),
        ("upstream: { http2_keepalive_interval: X }\n", "upstream.http2_keepalive_interval"),
        ("upstream: { http2_keepalive_timeout: X }\n", "upstream.http2_keepalive_timeout"),
        ("downstream: { tcp_idle_timeout: X }\n", "downstream.tcp_idle_timeout"),
        ("downstream: { http1_idle_timeout: X }\n", "downstream.http1_idle_timeout"),
        ("downstream: { http2_idle_timeout: X }\n", "downstream.http2_idle_timeout"),
        ("downstream: { http2_keepalive_interval: X }\n", "downstream.http2_keepalive_interval"),
        ("downstream: { http2_keepalive_timeout: X }\n", "downstream.http2_keepalive_timeout"),
    ];
    // Every key is tried before failing, so a failure lists all that slip through.
    let mut wrong = Vec::new();
    for (doc, field) in cases {
        let yaml = doc.replace('X', ABSURD);
        match Config::from_yaml(&yaml) {
            Ok(_) => wrong.push(format!("{field}: accepted")),
            Err(e) => {
                let msg = e.to_string();
                if field_of(e) != field || !msg.contains("at most") {
                    wrong.push(format!("{field}: {msg} (should name the key and state the bound)"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn absurd_durations_given_as_flags_are_refused_naming_the_key() {
    let huge = Some(Duration::from_secs(u64::MAX / 2));
    let cases: [(Overrides, &str); 6] = [
        (Overrides { drain_announce: huge, ..Default::default() }, "drain.announce"),
        (Overrides { drain_idle_close_window: huge, ..Default::default() }, "drain.idle_close_window"),
        (Overrides { drain_linger: huge, ..Default::default() }, "drain.linger"),
        (Overrides { detect_timeout: huge, ..Default::default() }, "inbound.detect_timeout"),
        (Overrides { connect_timeout: huge, ..Default::default() }, "upstream.connect_timeout"),
        (Overrides { drain_timeout: huge, ..Default::default() }, "drain.timeout"),
    ];
    for (o, field) in cases {
        let err = Config::default().apply(&o).unwrap_err();
        assert_eq!(field_of(err), field);
    }
}

#[test]
fn zero_response_timeout_is_refused() {
    assert_eq!(refused("upstream: { response_timeout: 0s }\n"), "upstream.response_timeout");
    Config::from_yaml("upstream: { response_timeout: 30s }\n").unwrap();
}

#[test]
fn colliding_binds_are_config_errors_naming_the_later_key() {
    let cases = [
        ("telemetry: { bind: 0.0.0.0:15021 }\n", "health.bind"),
        ("health: { bind: 127.0.0.1:15020 }\n", "health.bind"),
        ("outbound: { bind: 0.0.0.0:15006 }\n", "outbound.bind"),
        ("inbound: { bind: \"[::]:15001\" }\n", "outbound.bind"),
        (
            "listeners:\n  - { name: a, bind: 127.0.0.1:7000, target: 127.0.0.1:9, direction: inbound }\n  - { name: b, bind: 127.0.0.1:7000, target: 127.0.0.1:9, direction: inbound }\n",
            "listeners[1].bind",
        ),
        (
            "listeners:\n  - { name: a, bind: 127.0.0.1:15006, target: 127.0.0.1:9, direction: inbound }\n",
            "listeners[0].bind",
        ),
    ];
    for (yaml, field) in cases {
        assert_eq!(refused(yaml), field, "{yaml}");
    }
    // Port 0 never collides, and distinct loopback addresses on one port do not either.
    let ok = "listeners:\n  - { name: a, bind: 127.0.0.1:0, target: 127.0.0.1:9, direction: inbound }\n  - { name: b, bind: 127.0.0.1:0, target: 127.0.0.1:9, direction: inbound }\n";
    Config::from_yaml(&format!("{QUIET}{ok}")).unwrap();
    Config::from_yaml("inbound: { bind: 127.0.0.1:7000 }\noutbound: { bind: 127.0.0.2:7000 }\n").unwrap();
}

fn ebb_run(yaml: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let dir = Dir::new();
    let path = dir.0.join("ebb.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ebb"));
    cmd.arg("run").arg("--config").arg(&path).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_within(&mut cmd, Duration::from_secs(10))
}

#[test]
fn a_huge_duration_is_refused_by_the_process_with_exit_64() {
    let quiet_but = |section: &str, rest: &str| {
        QUIET.lines().filter(|l| !l.starts_with(&format!("{section}:"))).map(|l| format!("{l}\n")).collect::<String>()
            + rest
    };
    for (section, doc, field) in [
        ("inbound", "inbound: { enabled: false, detect_timeout: X }\n", "inbound.detect_timeout"),
        ("drain", "drain: { announce: X }\n", "drain.announce"),
        ("upstream", "upstream: { idle_timeout: X }\n", "upstream.idle_timeout"),
    ] {
        let yaml = quiet_but(section, &doc.replace('X', ABSURD));
        let out = ebb_run(&yaml, &[], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{yaml}\n{err}");
        assert!(err.contains(field), "stderr names {field}: {err}");
    }
}

#[test]
fn bad_flag_and_env_values_exit_64_and_help_exits_0() {
    for (args, env) in [
        (&["--workers", "many"][..], &[][..]),
        (&["--drain-timeout", "soon"][..], &[][..]),
        (&["--no-such-flag"][..], &[][..]),
        (&[][..], &[("EBB_WORKERS", "many")][..]),
        (&[][..], &[("EBB_INBOUND_BIND", "nowhere")][..]),
    ] {
        let out = ebb_run(QUIET, args, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {err}");
    }
    // An argument that is not UTF-8 is a bad value too (and must not panic the argument check).
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"--log-level=\xff");
        let out = output_within(Command::new(env!("CARGO_BIN_EXE_ebb")).arg(bad), Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Without the `run` subcommand too (it is the default).
    let out =
        output_within(Command::new(env!("CARGO_BIN_EXE_ebb")).args(["--workers", "many"]), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(64));
    for args in [&["--help"][..], &["--version"][..], &["run", "--help"][..]] {
        let out = output_within(Command::new(env!("CARGO_BIN_EXE_ebb")).args(args), Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(0), "{args:?}");
    }
}

#[test]
fn colliding_binds_exit_64_not_69() {
    let yaml = "inbound: { enabled: false }\noutbound: { enabled: false }\nadmin: { bind: 127.0.0.1:0 }\n\
telemetry: { bind: 127.0.0.1:0 }\nhealth: { bind: 127.0.0.1:0 }\nlisteners:\n\
  - { name: a, bind: 127.0.0.1:17999, target: 127.0.0.1:9, direction: inbound }\n\
  - { name: b, bind: 127.0.0.1:17999, target: 127.0.0.1:9, direction: inbound }\n";
    let out = ebb_run(yaml, &[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("listeners[1].bind"), "{err}");
}

/// Scalars that stress the parser: durations, addresses, numbers, odd YAML.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("500000000000y".to_string()),
        Just("0s".to_string()),
        Just("18446744073709551615s".to_string()),
        Just("-1s".to_string()),
        Just("~".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\"[::]:0\"".to_string()),
        Just("0.0.0.0:15006".to_string()),
        (0u64..100_000).prop_map(|n| format!("{n}ms")),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z0-9:.\\[\\]{}, -]{0,12}",
    ]
}

/// Keys, known and not, at the places the config has them.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("drain.timeout"),
        Just("drain.announce"),
        Just("drain.linger"),
        Just("drain.idle_close_window"),
        Just("inbound.bind"),
        Just("inbound.detect_timeout"),
        Just("inbound.opaque_ports"),
        Just("outbound.enabled"),
        Just("upstream.response_timeout"),
        Just("upstream.connect_timeout"),
        Just("upstream.idle_timeout"),
        Just("upstream.max_idle_per_endpoint"),
        Just("admin.bind"),
        Just("health.bind"),
        Just("log.level"),
        Just("workers"),
        Just("listeners"),
        Just("nonsense.key"),
        Just("drain.nonsense"),
    ]
    .prop_map(str::to_string)
}

/// A key that is the empty string (found by the property below): the refusal says so, rather than
/// naming a field with no name.
#[test]
fn an_empty_key_is_named_as_one() {
    assert_eq!(refused("'': 1\n"), "\"\" (an empty key)");
}

fn document(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| match k.split_once('.') {
            Some((section, key)) => format!("{section}: {{ {key}: {v} }}\n"),
            None => format!("{k}: {v}\n"),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// YAML-ish input never panics the parser, and every refusal names a field.
    #[test]
    fn arbitrary_documents_never_panic_and_errors_name_a_field(
        pairs in proptest::collection::vec((key(), scalar()), 0..6),
        noise in "[ -~\n]{0,40}",
    ) {
        for doc in [document(&pairs), format!("{}{noise}", document(&pairs)), noise.clone()] {
            if let Err(e) = Config::from_yaml(&doc) {
                let field = field_of(e);
                prop_assert!(!field.is_empty(), "{doc}");
            }
        }
    }

    /// A valid random config survives serialising and parsing again unchanged.
    #[test]
    fn valid_random_configs_round_trip(
        timeout in 0u64..3_600_000,
        announce in 0u64..3_600_000,
        linger in 0u64..60_000,
        detect in 1u64..300_000,
        connect in 1u64..60_000,
        response in proptest::option::of(1u64..3_600_000),
        idle in 1u64..3_600_000,
        workers in 0usize..64,
        ports in proptest::collection::hash_set(1024u16..u16::MAX, 6),
        opaque in proptest::collection::vec(any::<u16>(), 0..4),
    ) {
        let mut ports = ports.into_iter();
        let mut next = || ports.next().unwrap_or(0);
        let mut c = Config::default();
        c.drain.timeout = Duration::from_millis(timeout);
        c.drain.announce = Duration::from_millis(announce);
        c.drain.linger = Duration::from_millis(linger);
        c.inbound.detect_timeout = Duration::from_millis(detect);
        c.inbound.opaque_ports = opaque;
        c.upstream.connect_timeout = Duration::from_millis(connect);
        c.upstream.response_timeout = response.map(Duration::from_millis);
        c.upstream.idle_timeout = Duration::from_millis(idle);
        c.workers = workers;
        c.inbound.bind = format!("0.0.0.0:{}", next()).parse().unwrap();
        c.outbound.bind = format!("0.0.0.0:{}", next()).parse().unwrap();
        c.admin.bind = format!("127.0.0.1:{}", next()).parse().unwrap();
        c.telemetry.bind = format!("0.0.0.0:{}", next()).parse().unwrap();
        c.health.bind = format!("0.0.0.0:{}", next()).parse().unwrap();
        c.validate().unwrap();
        let yaml = serde_yaml_ng::to_string(&c).unwrap();
        let back = Config::from_yaml(&yaml).unwrap();
        prop_assert_eq!(serde_yaml_ng::to_string(&back).unwrap(), yaml);
    }
}
