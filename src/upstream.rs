//! Outbound resilience: clusters, endpoint choice, limits, outlier ejection and retries, composed as
//! tower layers over the connection pools of `http::client` (docs/architecture.md §12); `stack` is
//! where they are put together.

pub mod admission;
pub mod cluster;
pub mod cluster_limit;
pub mod endpoint;
pub mod outlier;
pub mod retry;
pub mod stack;
pub mod timeout;
pub mod wrap;
