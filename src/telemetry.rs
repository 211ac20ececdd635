//! Logs (text or JSON through `tracing`), metrics, and OpenTelemetry traces as another subscriber
//! layer with its own filter.

pub mod metrics;
pub mod ratelimit;
pub mod traces;

use tracing::Level;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{filter, EnvFilter, Layer as _};

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber for logs only. Safe to call more than once (later calls are
/// ignored), so tests can start several proxies in one process.
pub fn init_logging(cfg: &LogConfig) {
    let _ = subscriber(cfg, None).try_init();
}

/// Installs the global subscriber with trace export when an endpoint is configured (see
/// [`traces::pipeline`]). Later calls are ignored.
pub fn init(log: &LogConfig, tracing: &traces::TracingConfig, node_id: &str) -> Result<(), traces::TraceError> {
    let tracer = traces::pipeline(tracing, node_id)?;
    let _ = subscriber(log, tracer).try_init();
    traces::announce();
    Ok(())
}

/// The layered subscriber: the log layer under `log.level`; the trace layer (when there is a tracer)
/// under its own filter, so that the spans of traced requests (debug, off in logs by default) reach
/// traces, and so do the span events written for traces only (target `ebb::trace`).
///
/// Without a tracer the log filter is global rather than the log layer's own: per-layer filtering
/// makes every span enter and exit look the span up in the registry to read its filter bits, and
/// each connection's span is entered on every poll of its task (about 300 instructions per HTTP/1.1
/// request, BENCHMARKS.md "Streams inside their connection's task"). What is logged is the same.
fn subscriber(
    cfg: &LogConfig,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
) -> impl tracing::Subscriber + Send + Sync + for<'a> tracing_subscriber::registry::LookupSpan<'a> {
    let log_filter = || EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (global, own) = if tracer.is_none() {
        (Some((log_filter(), log_layer(cfg))), None)
    } else {
        (None, Some(log_layer(cfg).with_filter(log_filter())))
    };
    let (global_filter, plain_log) = global.unzip();
    // Spans: only those made for traces (target `ebb::otel`: traced requests and attempts, drains).
    // Events: those written for traces (`ebb::trace`) and Ebb's info and above, inside those spans.
    // The target list is decided per callsite, once: other crates' events (h2 writes one per frame)
    // and untraced requests' spans cost the trace layer nothing.
    let targets = filter::Targets::new()
        .with_target(traces::TARGET, Level::TRACE)
        .with_target("ebb::trace", Level::TRACE)
        .with_target("ebb", Level::INFO);
    let trace_filter = FilterExt::and(targets, filter::filter_fn(|m| !m.is_span() || m.target() == traces::TARGET));
    let trace = tracer.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(trace_filter)
    });
    tracing_subscriber::registry().with(global_filter).with(plain_log).with(own).with(trace)
}

/// The log layer in the configured format.
fn log_layer<S>(cfg: &LogConfig) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    match cfg.format {
        // Colours only on a terminal: a log collector or a pipe gets plain text, not escape codes.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
}
