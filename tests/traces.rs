//! OpenTelemetry traces reach a real OTLP receiver (a tonic `TraceService` in this process): a request
//! through a client Ebb and a server Ebb is one trace with the right parents, an incoming
//! `traceparent` is continued, a drain is a span with its phases and forced closes; and a collector
//! that is down costs requests nothing while the dropped spans are counted.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ebb::config::{ClusterConfig, Direction, EndpointConfig};
use ebb::drain::Trigger;
use http::{Request, StatusCode};
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::{base_config, client, eventually, listener, origin};

/// Every span received, with its resource's `service.name`.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Sink {
    fn spans(&self, trace: &[u8]) -> Vec<Span> {
        self.0.lock().unwrap().iter().filter(|(_, s)| s.trace_id == trace).map(|(_, s)| s.clone()).collect()
    }

    fn named(&self, name: &str) -> Vec<Span> {
        self.0.lock().unwrap().iter().filter(|(_, s)| s.name == name).map(|(_, s)| s.clone()).collect()
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| match &v.value {
        Some(Value::StringValue(x)) => Some(x.clone()),
        Some(Value::IntValue(i)) => Some(i.to_string()),
        Some(Value::BoolValue(b)) => Some(b.to_string()),
        _ => None,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn receiver() -> (SocketAddr, Sink) {
    let sink = Sink::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let svc = TraceServiceServer::new(sink.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    (addr, sink)
}

/// Every trace scenario in one test: the pipeline is process-wide and lives on the runtime that
/// started it, so the scenarios share one runtime and one receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_an_otlp_receiver_with_the_right_structure() {
    let (collector, sink) = receiver().await;
    let mut log = base_config().log;
    log.level = "warn".into();
    let tracing = ebb::telemetry::traces::TracingConfig {
        endpoint: Some(format!("http://{collector}")),
        service_name: "ebb-test".into(),
        sample_ratio: 1.0,
        ..Default::default()
    };
    ebb::telemetry::init(&log, &tracing, "node-under-test").expect("trace pipeline");

    // A server Ebb in front of an origin, and a client Ebb whose cluster is that server Ebb.
    let o = origin::http1("app").await;
    let mut cfg = base_config();
    cfg.listeners.push(listener("in", o.addr, Direction::Inbound));
    let server = ebb::app::start(cfg).await.unwrap();
    let vip: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut cfg = base_config();
    cfg.listeners.push(listener("out", vip, Direction::Outbound));
    cfg.clusters.push(ClusterConfig {
        name: "web".into(),
        addresses: vec![vip],
        endpoints: vec![EndpointConfig {
            addr: server.addr("in").unwrap(),
            weight: 1,
            state: Default::default(),
            node: None,
            identity: None,
        }],
        ..ClusterConfig::default()
    });
    let client_ebb = ebb::app::start(cfg).await.unwrap();

    // 1. An incoming traceparent is continued through both Ebbs.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let (mut tx, _task) = client::h1(client_ebb.addr("out").unwrap()).await;
    let req = Request::get("/traced")
        .header("host", "web.test")
        .header("traceparent", format!("00-{trace_id}-{caller}-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    client::text(res).await;
    drop(tx);

    // 2. A request without context starts a trace of its own.
    let (status, _) = client::fetch(client_ebb.addr("out").unwrap(), "GET", "/untraced").await;
    assert_eq!(status, StatusCode::OK);

    let want: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap()).collect();
    let complete = eventually(Duration::from_secs(10), async || {
        ebb::telemetry::traces::flush(Duration::from_secs(2)).await;
        sink.spans(&want).len() >= 4
    })
    .await;
    let spans = sink.spans(&want);
    assert!(
        complete,
        "expected 4 spans in trace {trace_id}, got {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    // Request spans: the client Ebb's is the caller's child, the server Ebb's is the attempt's child.
    // Nothing else is in the trace: the upstream connections outlive requests and are not part of it.
    assert_eq!(spans.len(), 4, "{:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    let requests: Vec<&Span> = spans.iter().filter(|s| s.name == "GET").collect();
    let attempts: Vec<&Span> = spans.iter().filter(|s| s.name == "attempt").collect();
    assert_eq!((requests.len(), attempts.len()), (2, 2), "{spans:#?}");
    let first = requests.iter().find(|s| hex(&s.parent_span_id) == caller).expect("a request span under the caller's");
    let first_attempt = attempts.iter().find(|a| a.parent_span_id == first.span_id).expect("the client Ebb's attempt");
    let second =
        requests.iter().find(|s| s.parent_span_id == first_attempt.span_id).expect("the server Ebb's request span");
    let second_attempt =
        attempts.iter().find(|a| a.parent_span_id == second.span_id).expect("the server Ebb's attempt");
    // The server Ebb's attempt went to the origin.
    assert_eq!(attr(second_attempt, "server.address"), Some(o.addr.to_string()));
    for r in [first, second] {
        assert_eq!(attr(r, "http.request.method").as_deref(), Some("GET"));
        assert_eq!(attr(r, "url.path").as_deref(), Some("/traced"));
        assert_eq!(attr(r, "http.response.status_code").as_deref(), Some("200"));
        assert_eq!(attr(r, "network.protocol.version").as_deref(), Some("1.1"));
        // Server kind (2), attempts client kind (3).
        assert_eq!(r.kind, 2);
    }
    assert_eq!(first_attempt.kind, 3);
    assert_eq!(attr(first_attempt, "server.address"), Some(server.addr("in").unwrap().to_string()));
    assert_eq!(attr(first_attempt, "ebb.attempt").as_deref(), Some("1"));
    assert_eq!(attr(first_attempt, "ebb.outcome").as_deref(), Some("200"));
    let resource = sink.0.lock().unwrap().iter().find(|(_, s)| s.trace_id == want).map(|(svc, _)| svc.clone());
    assert_eq!(resource.as_deref(), Some("ebb-test"));

    let untraced: Vec<Span> =
        sink.named("GET").into_iter().filter(|s| attr(s, "url.path").as_deref() == Some("/untraced")).collect();
    assert!(!untraced.is_empty(), "the untraced request has spans");
    let root = untraced.iter().find(|s| s.parent_span_id.is_empty()).expect("its first request span is a root");
    assert_ne!(root.trace_id, want);

    // 3. A drain is a span: its phases as events, the forced close as an event, the report as
    // attributes.
    let held = origin::http1("held").await;
    let mut cfg = base_config();
    cfg.listeners.push(listener("in", held.addr, Direction::Inbound));
    cfg.drain.announce = Duration::ZERO;
    let drained = ebb::app::start(cfg).await.unwrap();
    let stuck = tokio::spawn(client::fetch(drained.addr("in").unwrap(), "GET", "/hold"));
    held.arrivals(1, Duration::from_secs(5)).await;
    drained
        .drain
        .trigger_applied(Trigger { timeout: Some(Duration::from_millis(200)), ..Trigger::new("test-drain") })
        .await
        .unwrap();
    let report = drained.wait().await;
    assert_eq!(report.forced_closes, 1);
    held.release(1);
    let _ = stuck.await;
    let found = eventually(Duration::from_secs(10), async || {
        ebb::telemetry::traces::flush(Duration::from_secs(2)).await;
        sink.named("drain").iter().any(|s| attr(s, "ebb.drain.trigger").as_deref() == Some("test-drain"))
    })
    .await;
    assert!(found, "the drain span arrived");
    let span = sink
        .named("drain")
        .into_iter()
        .find(|s| attr(s, "ebb.drain.trigger").as_deref() == Some("test-drain"))
        .unwrap();
    assert!(span.parent_span_id.is_empty(), "a drain is a trace of its own");
    assert_eq!(attr(&span, "report.forced_closes").as_deref(), Some("1"));
    let phases: Vec<String> = span
        .events
        .iter()
        .filter(|e| e.name == "drain phase")
        .filter_map(|e| {
            e.attributes.iter().find(|kv| kv.key == "phase").and_then(|kv| kv.value.as_ref()).and_then(|v| {
                match &v.value {
                    Some(Value::StringValue(p)) => Some(p.clone()),
                    _ => None,
                }
            })
        })
        .collect();
    // With no announce phase the controller moves the drain to closing before it first publishes (it
    // advances as far as time allows when the trigger is applied), so announcing never shows; the
    // request held at the origin keeps it there until the deadline, and the forced close ends it.
    assert_eq!(phases, ["closing", "deadline", "drained"], "the drain span's phase events");
    assert!(span.events.iter().any(|e| e.name == "forced close"), "{:?}", span.events);
}

#[test]
fn with_the_collector_down_requests_flow_and_dropped_spans_are_counted() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = rt.block_on(origin::http1("app"));
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let yaml = format!(
        "inbound: {{ enabled: false }}\noutbound: {{ enabled: false }}\n\
         admin: {{ bind: 127.0.0.1:0 }}\ntelemetry: {{ bind: 127.0.0.1:0 }}\nhealth: {{ bind: 127.0.0.1:0 }}\n\
         listeners: [{{ name: web, bind: 127.0.0.1:0, target: {}, direction: inbound }}]\n\
         tracing: {{ sample_ratio: 1.0 }}\n",
        o.addr
    );
    let ebb = support::process::EbbProcess::start_with(&yaml, |c| {
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{dead}"));
    });
    let web = ebb.addr("web");
    rt.block_on(async {
        for i in 0..200 {
            let (status, body) = client::fetch(web, "GET", "/x").await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"), "request {i}");
        }
        let telemetry = ebb.addr("telemetry");
        let counted = eventually(Duration::from_secs(15), async || {
            let (_, text) = client::fetch(telemetry, "GET", "/metrics").await;
            text.lines().any(|l| {
                l.starts_with(r#"ebb_trace_spans_dropped_total{reason="export_failed"}"#)
                    && l.split_whitespace().last().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v >= 200.0)
            })
        })
        .await;
        assert!(counted, "the spans of 200 requests were counted as dropped");
    });
}

/// A receiver Ebb did not write: `otelsink` (PyPI `oteltest`, installed by `scripts/test.sh`), which listens on
/// its fixed port 4317 and prints what it receives.
#[test]
fn spans_reach_otelsink() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut sink = Command::new(support::peers::require("otelsink", "oteltest"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("otelsink starts");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = sink.stderr.take().unwrap();
    let stdout = sink.stdout.take().unwrap();
    let _sink = Kill(sink);
    // Ready once it says so on stderr.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx2.send(l);
        }
    });
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx.recv_timeout(until.saturating_duration_since(std::time::Instant::now())).expect("otelsink ready");
        if line.contains("ready to start") {
            break;
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = rt.block_on(origin::http1("app"));
    let yaml = format!(
        "inbound: {{ enabled: false }}\noutbound: {{ enabled: false }}\n\
         admin: {{ bind: 127.0.0.1:0 }}\ntelemetry: {{ bind: 127.0.0.1:0 }}\nhealth: {{ bind: 127.0.0.1:0 }}\n\
         listeners: [{{ name: web, bind: 127.0.0.1:0, target: {}, direction: inbound }}]\n\
         tracing: {{ endpoint: \"http://127.0.0.1:4317\", sample_ratio: 1.0, service_name: otelsink-smoke }}\n",
        o.addr
    );
    let ebb = support::process::EbbProcess::start(&yaml);
    let (status, _) = rt.block_on(client::fetch(ebb.addr("web"), "GET", "/seen-by-otelsink"));
    assert_eq!(status, StatusCode::OK);
    let until = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let line = rx
            .recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
            .expect("otelsink received our span");
        if line.contains("/seen-by-otelsink") && line.contains("otelsink-smoke") {
            break;
        }
    }
}
