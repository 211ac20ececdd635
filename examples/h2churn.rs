//! HTTP/2 churn load: `conns` connections each keeping `streams` GETs in flight, a fresh connection after
//! every GOAWAY, every stream classified; prints one JSON line (the report) and exits 0 whatever it saw.
//!
//! ```text
//! cargo run --release --example h2churn -- --addr 127.0.0.1:8080 [--conns 10] [--streams 10]
//!     [--duration 8s] [--path /] [--authority HOST]
//! ```

// The progress watch is for tests; this command only wants the final report.
#[allow(dead_code)]
#[path = "../tests/support/h2churn.rs"]
mod h2churn;
// The frame codec h2churn speaks through (`super::h2frame` from there); the rest is for other tests.
#[allow(dead_code)]
#[path = "../tests/support/h2frame.rs"]
mod h2frame;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Command-line flags.
#[derive(Parser, Debug)]
#[command(name = "h2churn", about = "HTTP/2 churn load; prints the report as one JSON line")]
struct Args {
    /// Server address (h2c, prior knowledge).
    #[arg(long)]
    addr: SocketAddr,
    /// Connections at a time.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    conns: u16,
    /// Streams kept in flight on each connection.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    streams: u16,
    /// How long to open streams (then up to 10 s for the last ones to finish).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// `:authority`; the address when absent.
    #[arg(long)]
    authority: Option<String>,
}

// One thread, like the other load clients of the benchmark (wrk -t1, h2load -t1).
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let opts = h2churn::ChurnOptions {
        addr: args.addr,
        authority: args.authority.unwrap_or_else(|| args.addr.to_string()),
        path: args.path,
        conns: args.conns.into(),
        streams: args.streams.into(),
        duration: args.duration,
    };
    let report = h2churn::Churn::start(opts).finish().await;
    println!("{}", serde_json::to_string(&report).expect("a report serializes"));
}
