//! OpenTelemetry traces: the export pipeline (OTLP over gRPC, batched on a bounded queue that drops
//! rather than waits, with every drop counted), W3C trace context in and out of requests, and the
//! filter that decides which `tracing` spans become trace spans (docs/architecture.md §10).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;

use tokio::sync::{mpsc, oneshot};

/// Trace export settings (`tracing:` in the config file).
pub use crate::config::tracing::TracingConfig;

/// The trace pipeline's own counters, registered with the metrics (telemetry::metrics).
pub struct TraceCounters {
    pub exported: Counter,
    pub dropped_queue_full: Counter,
    pub dropped_export_failed: Counter,
}

/// Created before the metrics registry exists (traces start with logging); the registry takes clones.
pub static COUNTERS: LazyLock<TraceCounters> = LazyLock::new(|| TraceCounters {
    exported: Counter::default(),
    dropped_queue_full: Counter::default(),
    dropped_export_failed: Counter::default(),
});

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The `tracing` target of spans made for traces; the trace layer takes no other spans.
pub const TARGET: &str = "ebb::otel";

/// Marks a request (in its extensions) as traced, so its attempts are too.
#[derive(Clone, Copy, Debug)]
pub struct Traced;

/// Which requests are traced: decided by Ebb before any span exists.
#[derive(Clone, Copy, Debug)]
struct Sampling {
    ratio: f64,
    /// A request arriving with a `traceparent` follows its sampled flag.
    parent_based: bool,
}

static SAMPLING: OnceLock<Sampling> = OnceLock::new();

/// The sampler in force: `OTEL_TRACES_SAMPLER` (+ `_ARG`) as the specification names them, else
/// parent-based at `tracing.sample_ratio`; with the name of an `OTEL_TRACES_SAMPLER` not supported.
fn sampling(cfg: &TracingConfig) -> (Sampling, Option<String>) {
    let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|r| r.clamp(0.0, 1.0));
    let ratio = arg.unwrap_or(1.0);
    let configured = Sampling { ratio: cfg.sample_ratio, parent_based: true };
    let sampling = match std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref().map(str::trim) {
        Some("always_on") => Sampling { ratio: 1.0, parent_based: false },
        Some("always_off") => Sampling { ratio: 0.0, parent_based: false },
        Some("traceidratio") => Sampling { ratio, parent_based: false },
        Some("parentbased_always_on") => Sampling { ratio: 1.0, parent_based: true },
        Some("parentbased_always_off") => Sampling { ratio: 0.0, parent_based: true },
        Some("parentbased_traceidratio") => Sampling { ratio, parent_based: true },
        Some(other) => return (configured, Some(other.to_string())),
        None => configured,
    };
    (sampling, None)
}

/// W3C trace context, looked up on every request while tracing is on: a ready-made name skips
/// parsing the key each time.
static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// Whether a request with these headers is traced. Parent-based: a `traceparent` decides by its
/// sampled flag; otherwise a draw at the ratio. False (and nothing else done) when traces are off.
pub fn decide(headers: &http::HeaderMap) -> bool {
    if !enabled() {
        return false;
    }
    let Some(s) = SAMPLING.get() else { return false };
    if s.parent_based {
        if let Some(tp) = headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()) {
            // version-traceid-spanid-flags
            if let Some(flags) = tp.rsplit('-').next().and_then(|f| u8::from_str_radix(f, 16).ok()) {
                return flags & 1 == 1;
            }
        }
    }
    s.ratio >= 1.0 || (s.ratio > 0.0 && fastrand::f64() < s.ratio)
}
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static FLUSH: OnceLock<mpsc::Sender<oneshot::Sender<()>>> = OnceLock::new();

/// Whether traces are exported: the request path skips context work when not.
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Why the trace pipeline could not start.
#[derive(Debug, thiserror::Error)]
#[error("tracing: {0}")]
pub struct TraceError(String);

/// The endpoint in force: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`, then the
/// config; none when `OTEL_SDK_DISABLED=true`.
pub fn endpoint(cfg: &TracingConfig) -> Option<String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT")).or(cfg.endpoint.clone())
}

/// Builds the pipeline and returns the tracer for the `tracing` layer; `None` when no endpoint is set.
/// The exporter runs on a thread of its own (see `Batcher`). Logs nothing: the subscriber is not
/// installed yet; [`announce`] says what was set up once it is.
pub fn pipeline(cfg: &TracingConfig, node_id: &str) -> Result<Option<opentelemetry_sdk::trace::Tracer>, TraceError> {
    let Some(endpoint) = endpoint(cfg) else { return Ok(None) };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut attrs = vec![
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", node_id.to_string()),
    ];
    if let Some(pod) = env("POD_NAME") {
        attrs.push(KeyValue::new("k8s.pod.name", pod));
    }
    if let Some(ns) = env("POD_NAMESPACE") {
        attrs.push(KeyValue::new("k8s.namespace.name", ns));
    }
    for (k, v) in &cfg.resource_attributes {
        attrs.push(KeyValue::new(k.clone(), v.clone()));
    }
    // Ours first, then OTEL_RESOURCE_ATTRIBUTES over them; service.name from OTEL_SERVICE_NAME, else
    // the config (the SDK's own fallback would be `unknown_service:ebb`).
    let service = env("OTEL_SERVICE_NAME").unwrap_or_else(|| cfg.service_name.clone());
    let resource = Resource::builder_empty()
        .with_attributes(attrs)
        .with_detector(Box::new(opentelemetry_sdk::resource::EnvResourceDetector::new()))
        .with_service_name(service)
        .build();
    let processor = Batcher::start(endpoint.clone(), resource.clone(), cfg.queue_size)?;
    // Ebb decides which requests are traced before it makes their spans (`decide`): what reaches
    // the SDK is to be recorded.
    let (sampling, unsupported) = sampling(cfg);
    let _ = SAMPLING.set(sampling);
    let _ = STARTED.set(Started { endpoint, unsupported });
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .with_sampler(Sampler::AlwaysOn)
        .build();
    let tracer = provider.tracer("ebb");
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Relaxed);
    Ok(Some(tracer))
}

/// What [`pipeline`] set up, for [`announce`].
struct Started {
    endpoint: String,
    unsupported: Option<String>,
}

static STARTED: OnceLock<Started> = OnceLock::new();

/// Logs the trace export [`pipeline`] started, with the sampler actually in force (call once the
/// subscriber is installed).
pub fn announce() {
    let (Some(started), Some(s)) = (STARTED.get(), SAMPLING.get()) else { return };
    if let Some(sampler) = &started.unsupported {
        tracing::warn!(sampler, "OTEL_TRACES_SAMPLER not supported; using tracing.sample_ratio");
    }
    tracing::info!(endpoint = %started.endpoint, ratio = s.ratio, parent_based = s.parent_based, "Exporting traces");
}

/// Sends what is queued and waits for it (bounded): called once before the process exits.
pub async fn flush(timeout: Duration) {
    let Some(tx) = FLUSH.get() else { return };
    let (done, wait) = oneshot::channel();
    // Bounded whole: the request queue holds one, so an earlier flush that timed out can make the
    // send itself wait for an export.
    let _ = tokio::time::timeout(timeout, async {
        if tx.send(done).await.is_ok() {
            let _ = wait.await;
        }
    })
    .await;
}

/// Batches ended spans on a bounded queue and exports them on a tokio task. The SDK's own batch
/// processor drops on a full queue too but keeps the count to itself; this one counts every span it
/// exports or drops, so the metric says what a slow or absent collector costs (spans, never requests).
#[derive(Debug)]
struct Batcher {
    tx: mpsc::Sender<SpanData>,
}

/// Spans sent in one export call at most.
const BATCH: usize = 512;
/// Longest a span waits in the queue before its batch goes.
const DELAY: Duration = Duration::from_secs(1);

impl Batcher {
    /// Starts the export on a thread of its own, with its own single-threaded runtime: encoding and
    /// sending a batch must not take a proxy worker (with `workers: 1`, a 512-span batch doubled the
    /// p99 of the requests that waited behind it). The exporter is built there, so its connection
    /// lives there too.
    fn start(endpoint: String, resource: Resource, queue: usize) -> Result<Self, TraceError> {
        let (tx, rx) = mpsc::channel::<SpanData>(queue);
        let (flush_tx, flush_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
        let (built_tx, built_rx) = std::sync::mpsc::channel::<Result<(), TraceError>>();
        std::thread::Builder::new()
            .name("ebb-otlp".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = built_tx.send(Err(TraceError(e.to_string())));
                        return;
                    }
                };
                rt.block_on(async move {
                    let built = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint)
                        .with_timeout(Duration::from_secs(5))
                        .build();
                    let mut exporter = match built {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = built_tx.send(Err(TraceError(e.to_string())));
                            return;
                        }
                    };
                    exporter.set_resource(&resource);
                    let _ = built_tx.send(Ok(()));
                    export_loop(exporter, rx, flush_rx).await;
                });
            })
            .map_err(|e| TraceError(e.to_string()))?;
        built_rx.recv().map_err(|_| TraceError("exporter thread ended".into()))??;
        let _ = FLUSH.set(flush_tx);
        Ok(Self { tx })
    }
}

/// Batches spans from `rx` and exports them until every sender is gone.
async fn export_loop<E: SpanExporter>(
    exporter: E,
    mut rx: mpsc::Receiver<SpanData>,
    mut flush_rx: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
    // When the oldest span in the batch has waited long enough.
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let (mut flushed, mut closed) = (None, false);
        let room = BATCH.saturating_sub(batch.len()).max(1);
        tokio::select! {
            n = rx.recv_many(&mut batch, room) => {
                closed = n == 0;
                if due.is_none() {
                    due = Some(tokio::time::Instant::now() + DELAY);
                }
            }
            _ = crate::clock::sleep_until_opt(due), if due.is_some() => {}
            f = flush_rx.recv() => {
                flushed = f;
                while let Ok(s) = rx.try_recv() {
                    batch.push(s);
                }
            }
        }
        let now = tokio::time::Instant::now();
        let go = batch.len() >= BATCH || closed || flushed.is_some() || due.is_some_and(|d| now >= d);
        if go {
            due = None;
            if !batch.is_empty() {
                let spans = std::mem::take(&mut batch);
                let n = spans.len() as u64;
                match tokio::time::timeout(Duration::from_secs(10), exporter.export(spans)).await {
                    Ok(Ok(())) => COUNTERS.exported.inc_by(n),
                    _ => COUNTERS.dropped_export_failed.inc_by(n),
                };
            }
        }
        if let Some(done) = flushed {
            let _ = done.send(());
        }
        if closed {
            return;
        }
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(span).is_err() {
            COUNTERS.dropped_queue_full.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Reads `traceparent`/`tracestate` from request headers.
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes `traceparent`/`tracestate` into request headers.
pub struct HeaderInjector<'a>(pub &'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(key), http::HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

/// Continues the trace an incoming request carries: `span` becomes the child of its `traceparent`.
/// A request without one starts a trace of its own (not a child of its connection's span, which
/// would put every request of a keep-alive connection in one trace). Nothing happens when traces
/// are off.
pub fn continue_from(span: &tracing::Span, headers: &http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !enabled() {
        return;
    }
    let cx = if headers.contains_key(&TRACEPARENT) {
        TraceContextPropagator::new().extract(&HeaderExtractor(headers))
    } else {
        opentelemetry::Context::new()
    };
    let _ = span.set_parent(cx);
}

/// Puts `span`'s context into an upstream request's headers (replacing the caller's, whose child
/// `span` is), so the next hop continues the trace.
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !enabled() {
        return;
    }
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The trace and span ids of `span`, for log lines; `None` when traces are off.
pub fn ids(span: &tracing::Span) -> Option<(String, String)> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !enabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}
