//! Ebb: a service-mesh sidecar proxy whose drain loses nothing.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod demo;
pub mod domain;
pub mod drain;
pub mod http;
pub mod inject;
pub mod limits;
pub mod proxy;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod upstream;
