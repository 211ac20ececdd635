//! The `tracing:` section: where and how OpenTelemetry traces are exported (docs/architecture.md §10).
//! Here with the rest of the config, not in `telemetry`, so that config depends on nothing above it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Trace export settings; the standard `OTEL_*` variables override them.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/gRPC collector (`http://collector:4317`); none (and no `OTEL_EXPORTER_OTLP_ENDPOINT`):
    /// no traces, and no cost.
    pub endpoint: Option<String>,
    /// `service.name`; `OTEL_SERVICE_NAME` wins.
    pub service_name: String,
    /// Share of new traces sampled (0 to 1). A request that arrives with a sampled `traceparent` is
    /// always traced (parent-based). `OTEL_TRACES_SAMPLER`/`_ARG` replace the sampler altogether.
    pub sample_ratio: f64,
    /// Spans waiting for export at most; more are dropped and counted.
    pub queue_size: usize,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES` adds to them).
    pub resource_attributes: HashMap<String, String>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            service_name: "ebb".into(),
            sample_ratio: 0.01,
            queue_size: 4096,
            resource_attributes: HashMap::new(),
        }
    }
}
