//! Outbound resilience: clusters, endpoint choice, limits, outlier ejection and retries, composed as
//! tower services over the connection pools of `http::client` (docs/architecture.md §12).

pub mod cluster;
pub mod limits;
pub mod outlier;
pub mod retry;
pub mod service;
