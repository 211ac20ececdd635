//! `ebb inject`: adds Ebb to Kubernetes workloads (docs/architecture.md §16). Each Pod, Deployment,
//! StatefulSet, DaemonSet, ReplicaSet, Job or CronJob gets the init container that writes the pod's
//! iptables rules, Ebb as a native sidecar, the shared volume holding the `ebb` CLI, and a preStop on
//! every app container that drains inbound through Ebb (after the container's own preStop, kept). Any
//! other document passes through untouched. Injecting twice gives what injecting once gave.

use std::time::Duration;

use serde::Deserialize as _;
use serde_yaml_ng::{Mapping, Value};

/// What to inject.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    /// The image repository: `<image>:proxy` runs Ebb, `<image>:init` writes the rules (with a tag
    /// already in it, `<image>-proxy` and `<image>-init`).
    pub image: String,
    /// The drain deadline: Ebb's `EBB_DRAIN_TIMEOUT` and the preStop's `--timeout`.
    pub drain_timeout: Duration,
    /// The control plane's URL for `EBB_CONTROL_PLANE`; none: Ebb runs on its static config.
    pub control_plane: Option<String>,
}

/// Why a document cannot be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {doc}: not YAML: {source}")]
    Parse { doc: usize, source: serde_yaml_ng::Error },
    #[error("document {doc} ({kind} `{name}`): {message}")]
    Refused { doc: usize, kind: String, name: String, message: String },
    #[error("cannot write YAML: {0}")]
    Write(#[from] serde_yaml_ng::Error),
}

/// The names Ebb's parts go by in a pod; what an earlier injection added is found by them.
const INIT: &str = "ebb-init";
const PROXY: &str = "ebb";
const VOLUME: &str = "ebb-bin";
/// The preStop every app container gets, before its flags.
const DRAIN: [&str; 3] = ["/ebb-bin/ebb", "drain", "--wait"];
/// Annotation on a pod (template) that keeps `ebb inject` away from it.
pub const OPT_OUT: &str = "ebb.io/inject";
/// Ebb's own UID: its traffic is exempt from capture, so an app running as it would bypass Ebb.
const PROXY_UID: i64 = 1337;

/// Where a kind keeps its pod spec.
fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&["spec"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some(&["spec", "template", "spec"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template", "spec"]),
        _ => None,
    }
}

fn key(k: &str) -> Value {
    Value::String(k.to_string())
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.as_mapping()?.get(*k))
}

fn get_mut<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.as_mapping_mut()?.get_mut(*k))
}

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

/// A mapping from pairs, in order.
fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (key(k), v)).collect())
}

fn seq<const N: usize>(items: [Value; N]) -> Value {
    Value::Sequence(items.into_iter().collect())
}

fn strings(items: &[&str]) -> Value {
    Value::Sequence(items.iter().map(|i| s(i)).collect())
}

/// `12s`, `1m30s`: as `--timeout` and `EBB_DRAIN_TIMEOUT` read it.
fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

fn image(repo: &str, target: &str) -> String {
    let last = repo.rsplit('/').next().unwrap_or(repo);
    if last.contains(':') {
        format!("{repo}-{target}")
    } else {
        format!("{repo}:{target}")
    }
}

fn env(name: &str, value: &str) -> Value {
    map([("name", s(name)), ("value", s(value))])
}

fn env_field(name: &str, path: &str) -> Value {
    map([("name", s(name)), ("valueFrom", map([("fieldRef", map([("fieldPath", s(path))]))]))])
}

fn http_probe(path: &str) -> Value {
    map([("path", s(path)), ("port", Value::from(15021))])
}

fn resources(cpu: (&str, &str), memory: (&str, &str)) -> Value {
    map([
        ("requests", map([("cpu", s(cpu.0)), ("memory", s(memory.0))])),
        ("limits", map([("cpu", s(cpu.1)), ("memory", s(memory.1))])),
    ])
}

/// The init container: writes the rules, then leaves the `ebb` CLI for the app's preStop.
fn init_container(o: &InjectOptions) -> Value {
    map([
        ("name", s(INIT)),
        ("image", s(&image(&o.image, "init"))),
        // The image's entrypoint is sidecar-init; it copies the static `ebb` itself (no shell needed).
        ("env", seq([env("EBB_INIT_EXCLUDE_INBOUND_PORTS", ""), env("EBB_INIT_INSTALL_EBB", "/ebb-bin/ebb")])),
        (
            "securityContext",
            map([
                ("runAsUser", Value::from(0)),
                ("runAsNonRoot", Value::Bool(false)),
                ("capabilities", map([("add", strings(&["NET_ADMIN", "NET_RAW"])), ("drop", strings(&["ALL"]))])),
            ]),
        ),
        ("volumeMounts", seq([map([("name", s(VOLUME)), ("mountPath", s("/ebb-bin"))])])),
        ("resources", resources(("10m", "100m"), ("16Mi", "32Mi"))),
    ])
}

/// Ebb as a native sidecar (an init container that keeps running): started before the app, stopped
/// after it, so the app's late outbound calls still have their proxy.
fn proxy_container(o: &InjectOptions, service: &str) -> Value {
    // The announce phase: 5 s, or a fifth of a shorter deadline.
    let announce = (o.drain_timeout / 5).min(Duration::from_secs(5));
    let mut envs = vec![
        env("EBB_DRAIN_TIMEOUT", &human(o.drain_timeout)),
        env("EBB_DRAIN_ANNOUNCE", &human(announce)),
        env("EBB_LOG_FORMAT", "json"),
    ];
    if let Some(cp) = &o.control_plane {
        envs.push(env("EBB_CONTROL_PLANE", cp));
    }
    envs.extend([
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env("POD_SERVICE", service),
    ]);
    map([
        ("name", s(PROXY)),
        ("image", s(&image(&o.image, "proxy"))),
        ("args", strings(&["run"])),
        ("restartPolicy", s("Always")),
        ("env", Value::Sequence(envs)),
        (
            "ports",
            seq([
                map([("name", s("ebb-metrics")), ("containerPort", Value::from(15020))]),
                map([("name", s("ebb-health")), ("containerPort", Value::from(15021))]),
            ]),
        ),
        (
            "startupProbe",
            map([
                ("httpGet", http_probe("/healthz/ready")),
                ("periodSeconds", Value::from(1)),
                ("failureThreshold", Value::from(30)),
            ]),
        ),
        ("readinessProbe", map([("httpGet", http_probe("/healthz/ready")), ("periodSeconds", Value::from(2))])),
        ("livenessProbe", map([("httpGet", http_probe("/healthz/live")), ("periodSeconds", Value::from(10))])),
        (
            "securityContext",
            map([
                ("runAsUser", Value::from(PROXY_UID)),
                ("runAsGroup", Value::from(PROXY_UID)),
                ("runAsNonRoot", Value::Bool(true)),
                ("allowPrivilegeEscalation", Value::Bool(false)),
                ("readOnlyRootFilesystem", Value::Bool(true)),
                ("capabilities", map([("drop", strings(&["ALL"]))])),
            ]),
        ),
        ("resources", resources(("50m", "1"), ("32Mi", "128Mi"))),
    ])
}

/// What must run before the drain: the container's own preStop, as `ebb drain` flags.
fn first_of(prestop: Option<&Value>, ports: Option<&Value>) -> Result<Vec<String>, String> {
    let Some(p) = prestop else { return Ok(Vec::new()) };
    if let Some(cmd) = get(p, &["exec", "command"]).and_then(Value::as_sequence) {
        let cmd: Vec<String> = cmd.iter().filter_map(|c| c.as_str().map(str::to_string)).collect();
        // Ours from an earlier injection: keep what it runs first.
        if cmd.len() >= 5 && cmd[..3] == DRAIN && cmd[3] == "--timeout" {
            return Ok(cmd[5..].to_vec());
        }
        let mut first = vec!["--".to_string()];
        first.extend(cmd);
        return Ok(first);
    }
    if let Some(secs) = get(p, &["sleep", "seconds"]).and_then(Value::as_u64) {
        return Ok(vec!["--first-sleep".into(), format!("{secs}s")]);
    }
    if let Some(h) = p.as_mapping().and_then(|m| m.get("httpGet")) {
        if get(h, &["scheme"]).and_then(Value::as_str).is_some_and(|s| !s.eq_ignore_ascii_case("http")) {
            return Err("its preStop httpGet is not plain HTTP; `ebb drain --first-get` speaks HTTP only".into());
        }
        let port = match get(h, &["port"]) {
            Some(Value::Number(n)) => n.as_u64().map(|p| p.to_string()),
            // A named port: the container's port of that name.
            Some(Value::String(name)) => ports.and_then(Value::as_sequence).and_then(|ps| {
                ps.iter()
                    .find(|p| get(p, &["name"]).and_then(Value::as_str) == Some(name.as_str()))
                    .and_then(|p| get(p, &["containerPort"]))
                    .and_then(Value::as_u64)
                    .map(|p| p.to_string())
            }),
            _ => None,
        };
        let Some(port) = port else {
            return Err("its preStop httpGet names a port the container does not declare".into());
        };
        let path = get(h, &["path"]).and_then(Value::as_str).unwrap_or("/");
        return Ok(vec!["--first-get".into(), format!("http://127.0.0.1:{port}{path}")]);
    }
    Err("its preStop is neither exec, sleep nor httpGet; it cannot be kept before the drain".into())
}

/// Adds Ebb to one pod spec; `service` names the workload for the plane.
fn inject_pod(spec: &mut Mapping, o: &InjectOptions, service: &str, at: &str) -> Result<(), String> {
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(format!(
            "{at}.hostNetwork is true: the pod shares the node's network, where Ebb's rules would capture the node's own traffic"
        ));
    }
    let pod_uid = get(&Value::Mapping(spec.clone()), &["securityContext", "runAsUser"]).and_then(Value::as_i64);
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_sequence_mut) else {
        return Err(format!("{at}.containers is missing"));
    };
    for (i, c) in containers.iter_mut().enumerate() {
        let name = get(c, &["name"]).and_then(Value::as_str).unwrap_or("?").to_string();
        let uid = get(c, &["securityContext", "runAsUser"]).and_then(Value::as_i64).or(pod_uid);
        if uid == Some(PROXY_UID) {
            return Err(format!(
                "{at}.containers[{i}] ({name}) runs as UID {PROXY_UID}, Ebb's own, whose traffic is never captured"
            ));
        }
        let first = first_of(get(c, &["lifecycle", "preStop"]), get(c, &["ports"]))
            .map_err(|e| format!("{at}.containers[{i}] ({name}): {e}"))?;
        let Some(c) = c.as_mapping_mut() else { continue };
        let mut cmd: Vec<String> = DRAIN.iter().map(|s| s.to_string()).collect();
        cmd.extend(["--timeout".to_string(), human(o.drain_timeout)]);
        cmd.extend(first);
        let prestop = map([("exec", map([("command", Value::Sequence(cmd.iter().map(|c| s(c)).collect()))]))]);
        let lifecycle = c.entry(key("lifecycle")).or_insert_with(|| Value::Mapping(Mapping::new()));
        if let Some(l) = lifecycle.as_mapping_mut() {
            l.insert(key("preStop"), prestop);
        }
        let mounts = c.entry(key("volumeMounts")).or_insert_with(|| Value::Sequence(Vec::new()));
        if let Some(m) = mounts.as_sequence_mut() {
            if !m.iter().any(|v| get(v, &["name"]).and_then(Value::as_str) == Some(VOLUME)) {
                m.push(map([("name", s(VOLUME)), ("mountPath", s("/ebb-bin")), ("readOnly", Value::Bool(true))]));
            }
        }
    }
    // What an earlier injection added is replaced, so flags and images are today's.
    let inits = spec.entry(key("initContainers")).or_insert_with(|| Value::Sequence(Vec::new()));
    if let Some(inits) = inits.as_sequence_mut() {
        inits.retain(|c| !matches!(get(c, &["name"]).and_then(Value::as_str), Some(INIT | PROXY)));
        inits.insert(0, proxy_container(o, service));
        inits.insert(0, init_container(o));
    }
    let volumes = spec.entry(key("volumes")).or_insert_with(|| Value::Sequence(Vec::new()));
    if let Some(v) = volumes.as_sequence_mut() {
        if !v.iter().any(|v| get(v, &["name"]).and_then(Value::as_str) == Some(VOLUME)) {
            v.push(map([("name", s(VOLUME)), ("emptyDir", Value::Mapping(Mapping::new()))]));
        }
    }
    // The grace period covers the drain and the app's own shutdown after it.
    let need = o.drain_timeout.as_secs() + 10;
    let grace = spec.get("terminationGracePeriodSeconds").and_then(Value::as_u64).unwrap_or(30);
    spec.insert(key("terminationGracePeriodSeconds"), Value::from(grace.max(need)));
    Ok(())
}

/// Injects every workload in `text` (one or many YAML documents); other documents pass unchanged.
pub fn inject(text: &str, o: &InjectOptions) -> Result<String, InjectError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let mut v = Value::deserialize(doc).map_err(|source| InjectError::Parse { doc: doc_no, source })?;
        if v.is_null() {
            continue;
        }
        let kind = get(&v, &["kind"]).and_then(Value::as_str).unwrap_or_default().to_string();
        let name = get(&v, &["metadata", "name"]).and_then(Value::as_str).unwrap_or_default().to_string();
        if let Some(path) = pod_spec_path(&kind) {
            // The pod's metadata: beside its spec.
            let meta_path: Vec<&str> = path[..path.len() - 1].iter().copied().chain(["metadata"]).collect();
            let meta = get(&v, &meta_path);
            let opted_out = meta
                .and_then(|m| get(m, &["annotations", OPT_OUT]))
                .and_then(Value::as_str)
                .is_some_and(|a| a == "false" || a == "disabled");
            let labels = meta.and_then(|m| get(m, &["labels"]));
            let service = ["app.kubernetes.io/name", "app"]
                .iter()
                .find_map(|l| labels.and_then(|ls| get(ls, &[l])).and_then(Value::as_str))
                .unwrap_or(&name)
                .to_string();
            if !opted_out {
                let at = path.join(".");
                let refused = |message: String| InjectError::Refused {
                    doc: doc_no,
                    kind: kind.clone(),
                    name: name.clone(),
                    message,
                };
                let spec = get_mut(&mut v, path)
                    .and_then(Value::as_mapping_mut)
                    .ok_or_else(|| refused(format!("{at} is missing")))?;
                inject_pod(spec, o, &service, &at).map_err(refused)?;
            }
        }
        out.push(serde_yaml_ng::to_string(&v)?);
    }
    Ok(out.join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> InjectOptions {
        InjectOptions { image: "reg.example/ebb".into(), drain_timeout: Duration::from_secs(25), control_plane: None }
    }

    #[test]
    fn an_existing_prestop_runs_first_and_survives_a_second_injection() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec:\n  containers:\n    - name: app\n      image: app\n      ports: [{ name: admin, containerPort: 9000 }]\n      lifecycle: { preStop: { httpGet: { path: /quit, port: admin } } }\n    - name: side\n      image: side\n      lifecycle: { preStop: { exec: { command: [/bin/stop, --now] } } }\n";
        let once = inject(pod, &opts()).unwrap();
        let v: Value = serde_yaml_ng::from_str(&once).unwrap();
        let cmd = |i: usize| -> Vec<String> {
            let c = get(&v, &["spec", "containers"]).unwrap().as_sequence().unwrap()[i].clone();
            serde_yaml_ng::from_value(get(&c, &["lifecycle", "preStop", "exec", "command"]).unwrap().clone()).unwrap()
        };
        assert_eq!(
            cmd(0),
            ["/ebb-bin/ebb", "drain", "--wait", "--timeout", "25s", "--first-get", "http://127.0.0.1:9000/quit"]
        );
        assert_eq!(cmd(1), ["/ebb-bin/ebb", "drain", "--wait", "--timeout", "25s", "--", "/bin/stop", "--now"]);
        assert_eq!(inject(&once, &opts()).unwrap(), once, "injecting twice changes nothing");
        // A new deadline re-renders the flags and keeps what runs first.
        let longer = InjectOptions { drain_timeout: Duration::from_secs(40), ..opts() };
        let again = inject(&once, &longer).unwrap();
        assert!(again.contains("- 40s\n") && again.contains("- /bin/stop\n"), "{again}");
        assert!(again.contains("terminationGracePeriodSeconds: 50"), "{again}");
    }

    #[test]
    fn what_cannot_be_injected_is_refused_naming_the_document_and_field() {
        let host = "kind: DaemonSet\nmetadata: { name: agent }\nspec:\n  template:\n    spec:\n      hostNetwork: true\n      containers: [{ name: a, image: a }]\n";
        let err = inject(&format!("kind: Service\nmetadata: {{ name: s }}\n---\n{host}"), &opts()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "document 2 (DaemonSet `agent`): spec.template.spec.hostNetwork is true: the pod shares the node's network, where Ebb's rules would capture the node's own traffic"
        );
        let uid = "kind: Pod\nmetadata: { name: p }\nspec:\n  securityContext: { runAsUser: 1337 }\n  containers: [{ name: a, image: a }]\n";
        assert!(inject(uid, &opts()).unwrap_err().to_string().contains("runs as UID 1337"));
    }

    #[test]
    fn images_follow_the_repository_or_its_tag() {
        assert_eq!(image("ghcr.io/example/ebb", "proxy"), "ghcr.io/example/ebb:proxy");
        assert_eq!(image("localhost:5000/ebb:1.2", "init"), "localhost:5000/ebb:1.2-init");
        assert_eq!(image("localhost:5000/ebb", "init"), "localhost:5000/ebb:init");
    }
}
