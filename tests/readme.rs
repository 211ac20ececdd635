//! What the README shows a user to copy is real and works: each YAML block is a file in the
//! repository, byte for byte; each example config runs under `ebb run` and passes `ebb check-config`;
//! the control-plane section's commands run as written on the example mesh file; every `ebb` command
//! line in the README and the Kubernetes manifests parses with the real command line; and `ebb run` on
//! its embedded defaults says what it listens on and what it needs.
//!
//! The examples bind the fixed ports a pod uses (15001, 15006, 8000, 15010…), so each runs inside a
//! network namespace of its own that the test makes: the commands run exactly as the README writes them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use ebb::command::Cli;
use support::netns::Netns;
use support::process::{output_within, stdout_lines};

const EBB: &str = env!("CARGO_BIN_EXE_ebb");
const WAIT: Duration = Duration::from_secs(30);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).expect("README.md")
}

/// A fenced block of the README: its info string, its text, and the line just above its fence.
struct Block {
    lang: String,
    text: String,
    above: String,
}

fn blocks(md: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = md.lines();
    let mut prev = "";
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let mut text = String::new();
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                text.push_str(l);
                text.push('\n');
            }
            out.push(Block { lang: lang.trim().to_string(), text, above: prev.to_string() });
            prev = "";
        } else {
            prev = line;
        }
    }
    out
}

/// The example files the README includes, from the `<!-- example: PATH -->` line above each block.
fn example_of(b: &Block) -> Option<PathBuf> {
    let path = b.above.strip_prefix("<!-- example: ")?.strip_suffix(" -->")?;
    Some(root().join(path))
}

#[test]
fn every_yaml_block_in_the_readme_is_an_example_file_word_for_word() {
    let md = readme();
    let yaml: Vec<Block> = blocks(&md).into_iter().filter(|b| b.lang == "yaml").collect();
    assert!(yaml.len() >= 3, "the README shows the cluster, listener and mesh examples; found {}", yaml.len());
    for b in &yaml {
        let path = example_of(b)
            .unwrap_or_else(|| panic!("a YAML block without an `<!-- example: PATH -->` line above it:\n{}", b.text));
        let file = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(b.text, file, "the README's block differs from {}", path.display());
    }
}

/// The reference plane's ConfigMap serves the same mesh the README shows.
#[test]
fn the_kubernetes_mesh_is_the_example_mesh() {
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/control-plane.yaml")).unwrap();
    let mesh = serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|doc| {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).ok()?;
            v["data"]["mesh.yaml"].as_str().map(str::to_string)
        })
        .next()
        .expect("a ConfigMap with mesh.yaml");
    let example = std::fs::read_to_string(root().join("examples/mesh.yaml")).unwrap();
    assert_eq!(mesh, example, "deploy/kubernetes/control-plane.yaml's mesh.yaml differs from examples/mesh.yaml");
}

fn example_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("examples/config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "examples/config holds the README's sidecar configs: {files:?}");
    files
}

fn ebb(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(EBB);
    cmd.current_dir(root()).args(args).env_remove("EBB_CONFIG");
    output_within(&mut cmd, WAIT)
}

#[test]
fn check_config_accepts_every_example_and_names_the_field_of_a_bad_one() {
    for path in example_configs() {
        let p = path.to_str().unwrap();
        ebb::config::Config::load(Some(&path)).unwrap_or_else(|e| panic!("{p}: {e}"));
        let out = ebb(&["check-config", "--config", p]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{p}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("a valid sidecar config"), "{p}: {stdout}");
        assert!(stdout.contains("drain: deadline"), "{p}: {stdout}");
    }
    let out = ebb(&["check-config", "--config", "examples/config/listeners.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("listener web on 127.0.0.1:8000 -> 127.0.0.1:8080"), "{stdout}");
    assert!(stdout.contains("drain: deadline 20s, announce 3s"), "{stdout}");
    // The identity examples: a sidecar that waits for its plane (so it is checked, not run) and the
    // mesh file that maps it.
    let out = ebb(&["check-config", "--config", "examples/plane-identity.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("identity from the control plane's CA, token /var/run/ebb/bootstrap/token"), "{stdout}");
    let out = ebb(&["check-config", "--mesh", "examples/mesh-mtls.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("identity spiffe://cluster.local/ns/default/sa/web for node web-*"), "{stdout}");
    let out = ebb(&["check-config", "--mesh", "examples/mesh.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("cluster web: 1 address(es), 2 endpoint(s)"), "{stdout}");

    // The same files made bad in one key each: exit 64, the key named.
    let dir = support::process::tempdir::Dir::new();
    let refused = |flag: &str, example: &str, from: &str, to: &str, field: &str| {
        let bad = dir.0.join(example.replace('/', "-"));
        let text = std::fs::read_to_string(root().join(example)).unwrap();
        assert!(text.contains(from), "{example} has `{from}`");
        std::fs::write(&bad, text.replace(from, to)).unwrap();
        let out = ebb(&["check-config", flag, bad.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{example} with `{to}`: {stderr}");
        assert!(stderr.contains(field), "{example} with `{to}` names {field}: {stderr}");
    };
    refused("--config", "examples/config/listeners.yaml", "timeout: 20s", "timeout: 2h", "drain.timeout");
    refused("--mesh", "examples/mesh.yaml", "num_retries: 2", "num_retries: 11", "clusters[0].retry.num_retries");

    // --dump prints a config that reads back as the same config.
    let out = ebb(&["check-config", "--config", "examples/config/clusters.yaml", "--dump"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let dumped = ebb::config::Config::from_yaml(&String::from_utf8_lossy(&out.stdout)).expect("the dump reads back");
    let file = ebb::config::Config::load(Some(&root().join("examples/config/clusters.yaml"))).unwrap();
    assert_eq!(dumped.clusters.len(), 1);
    assert_eq!(dumped.clusters[0].endpoints, file.clusters[0].endpoints);
}

/// A process started inside a namespace, its stdout read line by line; killed on drop.
struct Spawned {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Spawned {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn");
        let lines = stdout_lines(&mut child);
        Self { child, lines, seen: Vec::new() }
    }

    /// Reads lines until one contains `needle`; panics with what was seen after `WAIT`.
    fn wait_for(&mut self, needle: &str) -> String {
        let until = std::time::Instant::now() + WAIT;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with `{needle}`; seen:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn terminate(&mut self) -> Option<i32> {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
        let until = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < until {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("still running {WAIT:?} after SIGTERM");
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ip netns exec NS sh -c LINE` from the repository's root, `ebb` being the binary under test.
fn shell_in(ns: &Netns, line: &str) -> Command {
    let mut c = ns.command("sh");
    c.current_dir(root()).args(["-c", line]).env("EBB", EBB).env_remove("EBB_CONFIG");
    c
}

/// A README command line with its `ebb` made the binary under test (`$EBB` in the shell).
fn with_binary(line: &str) -> String {
    line.split(' ').map(|w| if w == "ebb" { "\"$EBB\"" } else { w }).collect::<Vec<_>>().join(" ")
}

#[test]
fn ebb_run_on_embedded_defaults_says_what_it_listens_on_and_what_it_needs() {
    let ns = Netns::new();
    let mut ebb = Spawned::start(shell_in(&ns, "exec \"$EBB\" run"));
    let first = ebb.wait_for("Starting");
    assert!(first.contains("embedded defaults"), "{first}");
    ebb.wait_for("Ready");
    let head = ebb.seen.join("\n");
    for addr in ["0.0.0.0:15006", "0.0.0.0:15001", "127.0.0.1:15000", "0.0.0.0:15020", "0.0.0.0:15021"] {
        assert!(head.contains(addr), "the first lines name {addr}:\n{head}");
    }
    assert!(head.contains("sidecar-init"), "the first lines say the capture needs sidecar-init's rules:\n{head}");
    assert!(head.contains("ebb demo"), "the first lines say how to see Ebb work:\n{head}");
    assert!(ebb.seen.len() <= 10, "that much is said in the first lines:\n{head}");
    assert_eq!(ebb.terminate(), Some(0), "SIGTERM drains and exits 0");
}

#[test]
fn every_example_config_runs_as_written() {
    for path in example_configs() {
        let ns = Netns::new();
        let line = format!("exec \"$EBB\" run --config {}", path.strip_prefix(root()).unwrap().display());
        let mut ebb = Spawned::start(shell_in(&ns, &line));
        ebb.wait_for("Ready");
        if path.ends_with("listeners.yaml") {
            assert!(ebb.seen.iter().any(|l| l.contains("127.0.0.1:8000")), "listener web bound: {:?}", ebb.seen);
        }
        assert_eq!(ebb.terminate(), Some(0), "{}: SIGTERM drains and exits 0", path.display());
    }
}

/// The control-plane section's commands, as the README writes them, with the plane's address made the
/// namespace's own and the sidecar named as Kubernetes would name `web-0` in `default`.
#[test]
fn the_control_plane_section_runs_as_written() {
    let md = readme();
    let section = &md[md.find("## The control plane").expect("a control-plane section")..];
    let block = blocks(section).into_iter().find(|b| b.lang == "sh").expect("its commands");
    let commands: Vec<String> = block
        .text
        .lines()
        .map(|l| l.split('#').next().unwrap().trim().replace("10.0.0.2", "127.0.0.1"))
        .filter(|l| !l.is_empty())
        .collect();
    let find = |needle: &str| {
        commands.iter().find(|c| c.contains(needle)).unwrap_or_else(|| panic!("a `{needle}` line in {commands:?}"))
    };
    let ns = Netns::new();

    let out = output_within(&mut shell_in(&ns, &with_binary(find("check-config"))), WAIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut plane = Spawned::start(shell_in(&ns, &format!("exec {}", with_binary(find("control-plane")))));
    plane.wait_for("Ready");
    let mut sidecar = Spawned::start({
        let mut c = shell_in(&ns, &format!("exec env {}", with_binary(find("ebb run"))));
        c.env("POD_NAME", "web-0").env("POD_NAMESPACE", "default");
        c
    });
    sidecar.wait_for("Ready");

    let ctl = |line: &str, timeout: Duration| {
        let mut c = shell_in(&ns, &with_binary(line));
        output_within(&mut c, timeout)
    };
    let sidecars = find("sidecars");
    // The sidecar registers on its own schedule: ask until it is listed, a bounded number of times.
    let listed = (0..300).any(|_| {
        let out = ctl(sidecars, WAIT);
        let yes = out.status.success() && String::from_utf8_lossy(&out.stdout).contains("web-0.default");
        if !yes {
            std::thread::sleep(Duration::from_millis(100));
        }
        yes
    });
    assert!(listed, "`{sidecars}` lists web-0.default");
    let out = ctl(find("drain web-0.default"), Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "drain: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("drained"), "the report: {stdout}");
    assert_eq!(sidecar.terminate(), Some(0));
    assert_eq!(plane.terminate(), Some(0));
}

/// Environment variables a command line may set: those the CLI reads, and those Ebb reads itself.
fn known_env() -> Vec<String> {
    fn walk(cmd: &clap::Command, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if let Some(e) = a.get_env() {
                out.push(e.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    walk(&Cli::command(), &mut out);
    out.extend(["POD_NAME", "POD_NAMESPACE", "POD_SERVICE"].map(String::from));
    out
}

/// Parses one command line (`VAR=value ... ebb args`) with the real parser; variables must be known.
fn parse_line(line: &str, known: &[String]) -> Result<(), String> {
    let mut words = line.split_whitespace().peekable();
    while let Some(w) = words.peek() {
        match w.split_once('=') {
            Some((var, _)) if var.chars().all(|c| c.is_ascii_uppercase() || c == '_') => {
                if !(known.iter().any(|k| k == var) || var.starts_with("OTEL_")) {
                    return Err(format!("`{line}` sets {var}, which Ebb does not read"));
                }
                words.next();
            }
            _ => break,
        }
    }
    let argv: Vec<&str> = words.collect();
    Cli::try_parse_from(&argv).map(|_| ()).map_err(|e| format!("`{line}`: {e}"))
}

/// The `ebb` invocations in a README block: `ebb …` lines, `cargo run … -- …` as `ebb …`, and in text
/// blocks the lines typed after a `$ ` prompt.
fn invocations(b: &Block) -> Vec<String> {
    let mut out = Vec::new();
    for raw in b.text.lines() {
        let line = if b.lang == "sh" {
            raw
        } else {
            match raw.strip_prefix("$ ") {
                Some(l) => l,
                None => continue,
            }
        };
        let line = line.split(" #").next().unwrap().trim();
        if let Some((_, rest)) = line.split_once("cargo run --release -- ") {
            out.push(format!("ebb {rest}"));
        } else if line.split_whitespace().any(|w| w == "ebb") {
            out.push(line.to_string());
        }
    }
    out
}

#[test]
fn every_ebb_command_in_the_readme_parses() {
    let known = known_env();
    let md = readme();
    let lines: Vec<String> =
        blocks(&md).iter().filter(|b| b.lang == "sh" || b.lang == "text").flat_map(invocations).collect();
    assert!(lines.len() >= 7, "the demo, the plane's commands, the trace example: {lines:?}");
    let errors: Vec<String> = lines.iter().filter_map(|l| parse_line(l, &known).err()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    // The check itself refuses what the CLI does not take.
    assert!(parse_line("ebb drain --wiat", &known).is_err());
    assert!(parse_line("EBB_DRAIN_TIMEOUTS=1s ebb run", &known).is_err());
}

#[test]
fn every_ebb_command_in_the_kubernetes_manifests_parses() {
    let known = known_env();
    let mut checked = 0;
    for file in ["deploy/kubernetes/deployment.yaml", "deploy/kubernetes/control-plane.yaml"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
            let spec = &v["spec"]["template"]["spec"];
            let containers = ["initContainers", "containers"]
                .iter()
                .filter_map(|k| spec[*k].as_sequence())
                .flatten()
                .collect::<Vec<_>>();
            for c in containers {
                let strings = |key: &str| -> Vec<String> {
                    c[key].as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
                };
                let image = c["image"].as_str().unwrap_or_default();
                if image.ends_with("/ebb:proxy") && c["command"].is_null() {
                    let args = strings("args");
                    let mut line: Vec<String> = c["env"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .filter_map(|e| Some(format!("{}=x", e["name"].as_str()?)))
                        .collect();
                    line.push("ebb".into());
                    line.extend(args);
                    parse_line(&line.join(" "), &known).unwrap_or_else(|e| panic!("{file}: {e}"));
                    checked += 1;
                }
                let hook = &c["lifecycle"]["preStop"]["exec"]["command"];
                let hook: Vec<String> =
                    hook.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect();
                if hook.first().is_some_and(|p| p.ends_with("/ebb")) {
                    let line = format!("ebb {}", hook[1..].join(" "));
                    parse_line(&line, &known).unwrap_or_else(|e| panic!("{file}: {e}"));
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 3, "the sidecar's args, the app's preStop and the plane's args");
}
