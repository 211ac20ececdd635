//! HTTP/1.1 and HTTP/2 proxying on hyper.

pub mod body;
pub mod client;
pub mod error;
pub mod headers;
pub mod hop;
pub mod inline;
pub mod policy;
pub mod server;
pub mod websocket;
