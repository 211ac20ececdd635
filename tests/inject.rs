//! `ebb inject` as a user runs it: the shipped manifest is exactly its output on a plain Deployment;
//! every workload kind gets Ebb (init container, native sidecar, volume, preStop, grace period), other
//! documents pass untouched, injecting twice changes nothing, and what cannot be injected is refused
//! by name. And the preStop it writes keeps the app's own hook: `ebb drain` runs it first, while Ebb
//! still serves, then drains.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ebb::config::Direction;
use serde_yaml_ng::Value;
use support::process::output_within;
use support::{base_config, client, listener, origin};

const EBB: &str = env!("CARGO_BIN_EXE_ebb");
const WAIT: Duration = Duration::from_secs(20);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `ebb inject ARGS` with `stdin` fed in: exit code, stdout, stderr.
fn inject(args: &[&str], stdin: Option<&str>) -> (Option<i32>, String, String) {
    let mut child = Command::new(EBB)
        .arg("inject")
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn docs(text: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn names(list: &Value) -> Vec<&str> {
    list.as_sequence().map(|s| s.iter().filter_map(|c| c["name"].as_str()).collect()).unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    serde_yaml_ng::from_value(v.clone()).unwrap_or_default()
}

#[test]
fn the_shipped_manifest_is_ebb_injects_output_on_a_plain_deployment() {
    let control = "http://ebb-control-plane.ebb-system.svc:15010";
    let (code, out, err) = inject(&["examples/kubernetes/web.yaml", "--control-plane", control], None);
    assert_eq!(code, Some(0), "{err}");
    let shipped = std::fs::read_to_string(root().join("deploy/kubernetes/deployment.yaml")).unwrap();
    // The shipped file is a header of comments, then the output word for word.
    let body: String = shipped.lines().skip_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    assert_eq!(body, out, "deploy/kubernetes/deployment.yaml is not `ebb inject`'s output; regenerate it");
    // The same from stdin.
    let plain = std::fs::read_to_string(root().join("examples/kubernetes/web.yaml")).unwrap();
    let (code, from_stdin, _) = inject(&["-", "--control-plane", control], Some(&plain));
    assert_eq!((code, from_stdin), (Some(0), out));
}

#[test]
fn every_workload_kind_gets_ebb_and_other_documents_pass_untouched() {
    let path = "examples/kubernetes/workloads.yaml";
    let input = docs(&std::fs::read_to_string(root().join(path)).unwrap());
    let (code, out, err) = inject(&[path, "--drain-timeout", "40s", "--image", "reg.example/mesh/ebb"], None);
    assert_eq!(code, Some(0), "{err}");
    let output = docs(&out);
    assert_eq!(output.len(), input.len());
    let mut injected = Vec::new();
    for (before, after) in input.iter().zip(&output) {
        let kind = before["kind"].as_str().unwrap();
        let spec_path: &[&str] = match kind {
            "Pod" => &["spec"],
            "StatefulSet" | "DaemonSet" | "Job" => &["spec", "template", "spec"],
            "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
            _ => {
                assert_eq!(before, after, "{kind} passes through untouched");
                continue;
            }
        };
        if before["metadata"]["annotations"]["ebb.io/inject"] == "false" {
            assert_eq!(before, after, "an opted-out {kind} is untouched");
            continue;
        }
        injected.push(kind);
        let spec = at(after, spec_path);
        // Ebb's two containers come first, whatever init containers the workload had after them.
        let before_inits = names(&at(before, spec_path)["initContainers"]);
        let mut expect = vec!["ebb-init", "ebb"];
        expect.extend(before_inits);
        assert_eq!(names(&spec["initContainers"]), expect, "{kind}");
        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always", "{kind}: a native sidecar");
        assert_eq!(proxy["image"], "reg.example/mesh/ebb:proxy");
        assert_eq!(spec["initContainers"][0]["image"], "reg.example/mesh/ebb:init");
        assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
        assert!(names(&spec["volumes"]).contains(&"ebb-bin"), "{kind}");
        // Every app container drains through Ebb, after its own preStop.
        for c in spec["containers"].as_sequence().unwrap() {
            let cmd = strings(&c["lifecycle"]["preStop"]["exec"]["command"]);
            assert_eq!(cmd[..5], ["/ebb-bin/ebb", "drain", "--wait", "--timeout", "40s"], "{kind}");
            assert!(names(&c["volumeMounts"]).contains(&"ebb-bin"), "{kind}");
        }
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(grace >= 50, "{kind}: the grace period covers the 40 s drain: {grace}");
    }
    assert_eq!(injected, ["StatefulSet", "DaemonSet", "Job", "CronJob"]);
    // The hooks the workloads had are kept, run first.
    let first = |i: usize, path: &[&str]| {
        strings(&at(&output[i], path)["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])[5..].to_vec()
    };
    assert_eq!(first(1, &["spec", "template", "spec"]), ["--", "pg_ctl", "stop", "-m", "fast"]);
    assert_eq!(first(2, &["spec", "template", "spec"]), ["--first-get", "http://127.0.0.1:9000/flush"]);
    assert_eq!(first(4, &["spec", "jobTemplate", "spec", "template", "spec"]), ["--first-sleep", "3s"]);
    assert_eq!(
        at(&output[1], &["spec", "template", "spec"])["terminationGracePeriodSeconds"],
        60,
        "a longer grace stays"
    );

    // Injecting the output again changes nothing.
    let (code, twice, err) = inject(&["-", "--drain-timeout", "40s", "--image", "reg.example/mesh/ebb"], Some(&out));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(twice, out, "injecting twice changes nothing");
}

#[test]
fn what_cannot_be_injected_is_refused_naming_the_document() {
    let host = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: { name: node-agent }\nspec:\n  selector: { matchLabels: { a: b } }\n  template:\n    metadata: { labels: { a: b } }\n    spec:\n      hostNetwork: true\n      containers: [{ name: agent, image: agent }]\n";
    let (code, out, err) = inject(&[], Some(host));
    assert_eq!(code, Some(64));
    assert!(out.is_empty(), "nothing is printed for a refused input: {out}");
    assert!(err.contains("document 1 (DaemonSet `node-agent`): spec.template.spec.hostNetwork is true"), "{err}");
    let (code, _, err) = inject(&[], Some("kind: Pod\nspec: [not, a, pod]\n"));
    assert_eq!(code, Some(64), "{err}");
    let (code, _, err) = inject(&[], Some("kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: a, lifecycle: {preStop: {tcpSocket: {port: 1}}}}]}\n"));
    assert_eq!(code, Some(64));
    assert!(err.contains("neither exec, sleep nor httpGet"), "{err}");
}

/// The preStop `ebb inject` writes for an app that had its own: that hook runs first, while Ebb still
/// serves (it sees Ebb `serving`), then the drain; an app's `httpGet` hook reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebb_drain_runs_the_apps_own_prestop_first_then_drains() {
    let app = origin::http1("app").await;
    let mut cfg = base_config();
    cfg.listeners.push(listener("in", app.addr, Direction::Inbound));
    cfg.drain.announce = Duration::from_millis(100);
    let ebb = ebb::app::start(cfg).await.expect("Ebb starts");
    let admin = ebb.admin.unwrap().to_string();
    let dir = support::process::tempdir::Dir::new();
    let seen: PathBuf = dir.0.join("seen.json");
    let hook = format!("\"{EBB}\" status --admin {admin} --json > {}", seen.display());
    let url = format!("http://{}/flush", app.addr);
    let hits = app.hits.load(std::sync::atomic::Ordering::SeqCst);
    let mut cmd = Command::new(EBB);
    cmd.args([
        "drain",
        "--admin",
        &admin,
        "--wait",
        "--timeout",
        "5s",
        "--first-get",
        &url,
        "--",
        "/bin/sh",
        "-c",
        &hook,
    ]);
    let out = tokio::task::spawn_blocking(move || output_within(&mut cmd, WAIT)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
    assert_eq!(status["status"]["state"], "serving", "the app's own hook ran before the drain began");
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), hits + 1, "the httpGet hook reached the app");
    assert_ne!(client::json(ebb.admin.unwrap(), "/status").await["state"], "serving", "then Ebb drained");
}
