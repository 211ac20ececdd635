//! The `ebb` command line: every subcommand and flag, parsed by clap. In the library so that tests
//! can check the commands the README and the Kubernetes manifests show against the real parser.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Overrides;

/// The subcommands that keep clap's own exit codes (2 for a usage error). A bad flag or `EBB_*` value
/// of `ebb run` (also the default) and of `ebb check-config`, which reads the same, is a config error.
pub const OPERATOR_COMMANDS: [&str; 9] =
    ["drain", "status", "wait-ready", "help", "ctl", "control-plane", "demo", "inject", "demo-app"];

#[derive(Parser, Debug)]
#[command(name = "ebb", version, about = "A service-mesh sidecar proxy whose drain loses nothing")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// YAML config file; without one Ebb runs on its embedded defaults
    #[arg(long, short = 'c', env = "EBB_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
}

#[derive(clap::Args, Debug, Clone)]
pub struct AdminArg {
    /// Address of the local Ebb's admin API
    #[arg(long, env = "EBB_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy (the default)
    Run(Box<RunArgs>),
    /// Check a sidecar config (file, `EBB_*` variables and flags, as `run` reads them) or a control
    /// plane's mesh file without starting anything; exit 64 naming the field when it is bad
    CheckConfig {
        #[command(flatten)]
        run: Box<RunArgs>,
        /// Check this mesh file (for `ebb control-plane --config`) instead of a sidecar config
        #[arg(long, value_name = "FILE", conflicts_with = "config")]
        mesh: Option<PathBuf>,
        /// Print the effective sidecar config as YAML (every default filled in)
        #[arg(long, conflicts_with = "mesh")]
        dump: bool,
    },
    /// Ask the local Ebb to drain (the preStop hook)
    Drain {
        #[command(flatten)]
        admin: AdminArg,
        /// Follow the drain and print the report when it is done
        #[arg(long)]
        wait: bool,
        /// Deadline from now (shortens a drain under way, never lengthens it)
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// `inbound` (default) or `all`
        #[arg(long)]
        scope: Option<String>,
        /// Close everything at once
        #[arg(long)]
        now: bool,
        /// End the process once drained (as SIGTERM does); without it Ebb keeps serving outbound
        #[arg(long)]
        exit: bool,
        /// Sleep this long before the drain (an app's own `sleep` preStop, kept by `ebb inject`)
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        first_sleep: Option<Duration>,
        /// GET this http:// URL before the drain (an app's own `httpGet` preStop, kept by `ebb inject`)
        #[arg(long, value_name = "URL")]
        first_get: Option<String>,
        /// A command to run before the drain (an app's own `exec` preStop, kept by `ebb inject`); its
        /// failure is reported and the drain goes on
        #[arg(last = true, value_name = "COMMAND")]
        first: Vec<String>,
    },
    /// The demo's app alone: HTTP/1.1, HTTP/2 and gRPC until SIGTERM (the app image of the container tests)
    #[command(hide = true)]
    DemoApp {
        /// HTTP/1.1 address
        #[arg(long, default_value = "0.0.0.0:8080")]
        http1: SocketAddr,
        /// HTTP/2 (h2c) and gRPC address
        #[arg(long, default_value = "0.0.0.0:8081")]
        http2: SocketAddr,
        /// Time to answer each request
        #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
        latency: Duration,
        /// On SIGTERM, GET this http:// URL before exiting (an app's late outbound call in its shutdown)
        #[arg(long, value_name = "URL")]
        on_term_get: Option<String>,
    },
    /// Add Ebb to Kubernetes workloads (YAML from FILE or stdin, one or many documents) and print them
    Inject {
        /// The YAML to inject; `-` or none: stdin
        file: Option<PathBuf>,
        /// Ebb's image repository: `<image>:proxy` and `<image>:init`
        #[arg(long, default_value = "ghcr.io/example/ebb")]
        image: String,
        /// The drain deadline (EBB_DRAIN_TIMEOUT and the preStop's --timeout)
        #[arg(long, value_parser = humantime::parse_duration, default_value = "25s")]
        drain_timeout: Duration,
        /// The control plane's URL (EBB_CONTROL_PLANE); none: Ebb runs on its static config
        #[arg(long)]
        control_plane: Option<String>,
    },
    /// Show what the local Ebb holds: state, connections, what holds a drain
    Status {
        #[command(flatten)]
        admin: AdminArg,
        /// Print the raw JSON
        #[arg(long)]
        json: bool,
    },
    /// A whole mesh on this machine, rolling-restarted under load: does any request fail?
    Demo(Box<crate::demo::DemoOptions>),
    /// Run the reference control plane: serve a mesh file to sidecars (reloaded when it changes)
    ControlPlane {
        /// The mesh file: clusters (endpoints with the node in front of each) and inbound policy
        #[arg(long, short = 'c', env = "EBB_MESH_CONFIG")]
        config: PathBuf,
        /// gRPC address to serve MeshControl and MeshAdmin on
        #[arg(long, env = "EBB_PLANE_LISTEN", default_value = "0.0.0.0:15010")]
        listen: SocketAddr,
        /// Log format
        #[arg(long, env = "EBB_LOG_FORMAT", default_value = "text")]
        log_format: crate::config::LogFormat,
        /// Log filter
        #[arg(long, env = "EBB_LOG", default_value = "info")]
        log_level: String,
        #[command(flatten)]
        security: PlaneSecurityArgs,
    },
    /// Operate the mesh through the reference control plane
    Ctl {
        /// The control plane's gRPC address (`https://` for a plane with a CA)
        #[arg(long, env = "EBB_PLANE_ADDR", default_value = "http://127.0.0.1:15010")]
        plane: String,
        #[command(flatten)]
        tls: crate::control::ctl::CtlTlsArgs,
        /// Print JSON instead of tables
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: crate::control::ctl::CtlCommand,
    },
    /// Block until the local Ebb is ready (the postStart hook)
    WaitReady {
        #[command(flatten)]
        admin: AdminArg,
        /// Give up after this long (exit 1)
        #[arg(long, value_parser = wait_timeout, default_value = "60s")]
        timeout: Duration,
    },
}

/// `ebb control-plane`'s CA and TLS (docs/architecture.md §15).
#[derive(clap::Args, Debug, Clone)]
pub struct PlaneSecurityArgs {
    /// The mesh CA's directory (ca.crt, ca.key; made there, with an operator certificate, when both
    /// are missing). Set, the plane serves TLS only, issues workload identities, and trusts callers
    /// by their certificates; unset, it runs without TLS and MeshAdmin answers loopback only
    #[arg(long, env = "EBB_PLANE_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// The trust domain of the identities the CA issues to the plane and the operator
    #[arg(long, env = "EBB_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Life of the certificates the CA issues (renewed at ~70 %)
    #[arg(long, env = "EBB_CERT_LIFE", value_parser = cert_life, default_value = "24h")]
    pub cert_life: Duration,
    /// DNS names and IPs put in the plane's own certificate, beside its SPIFFE ID (repeatable)
    #[arg(long = "tls-name", env = "EBB_PLANE_TLS_NAMES", value_delimiter = ',', default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub tls_names: Vec<String>,
    /// SPIFFE IDs allowed MeshAdmin (repeatable; default spiffe://<trust-domain>/ebb/operator)
    #[arg(long = "operator", env = "EBB_PLANE_OPERATORS", value_delimiter = ',')]
    pub operators: Vec<String>,
}

fn cert_life(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < crate::control::ca::MIN_CERT_LIFE || d > Duration::from_secs(365 * 24 * 3600) {
        return Err("between 10s and 365d".into());
    }
    Ok(d)
}

/// Longest `ebb wait-ready --timeout`: a deadline is `now + timeout`, which must not overflow.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

fn wait_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > MAX_WAIT {
        return Err(format!("at most {}", humantime::format_duration(MAX_WAIT)));
    }
    Ok(d)
}
