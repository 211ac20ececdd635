//! The `ebb` command: the proxy (`run`, the default) and the operator commands that talk to it.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use ebb::command::{Cli, Command, RunArgs, OPERATOR_COMMANDS};

/// mimalloc when built with `--features mimalloc` (see BENCHMARKS.md for what it changes).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ebb::config::Config;

/// Exit code for a configuration error (EX_USAGE… no: sysexits EX_DATAERR is 65; we use 64 by design).
const EXIT_CONFIG: u8 = 64;
/// Exit code when a port cannot be bound (sysexits EX_UNAVAILABLE).
const EXIT_BIND: u8 = 69;

/// A multi-threaded runtime for a long-running command (the plane, the demo's app); says why if none.
fn server_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("ebb: cannot start the runtime: {e}");
            None
        }
    }
}

fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Parses the command line. `ebb run` (also the default) documents exit 64 for a bad value, whether it
/// came from a flag or an `EBB_*` variable; clap would exit 2. Help and version still exit 0.
fn parse() -> Result<Cli, ExitCode> {
    use clap::error::ErrorKind;
    let e = match Cli::try_parse() {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    let informational = matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    // `args_os`: `args` panics on an argument that is not UTF-8.
    let operator =
        std::env::args_os().nth(1).is_some_and(|a| a.to_str().is_some_and(|a| OPERATOR_COMMANDS.contains(&a)));
    if informational || operator {
        e.exit();
    }
    let _ = e.print();
    Err(ExitCode::from(EXIT_CONFIG))
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        None => run(cli.run),
        Some(Command::Run(args)) => run(*args),
        Some(Command::CheckConfig { run, mesh, dump }) => check_config(&run, mesh.as_deref(), dump),
        Some(Command::ControlPlane { config, listen, log_format, log_level, security }) => {
            control_plane(config, listen, log_format, log_level, security)
        }
        Some(Command::Demo(opts)) => demo(*opts),
        Some(Command::DemoApp { http1, http2, latency, on_term_get }) => demo_app(http1, http2, latency, on_term_get),
        Some(Command::Inject { file, image, drain_timeout, control_plane }) => {
            let o = ebb::inject::InjectOptions { image, drain_timeout, control_plane };
            inject(file, &o)
        }
        Some(cmd) => {
            let rt = match client_runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ebb: cannot start a runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(operator(cmd))
        }
    }
}

async fn operator(cmd: Command) -> ExitCode {
    let result = match cmd {
        Command::Drain { admin, wait, timeout, scope, now, exit, first_sleep, first_get, first } => {
            let o = ebb::cli::DrainOptions { wait, timeout, scope, now, exit, first_sleep, first_get, first };
            ebb::cli::drain(admin.admin, &o).await
        }
        Command::Status { admin, json } => ebb::cli::status(admin.admin, json).await,
        Command::WaitReady { admin, timeout } => {
            if ebb::cli::wait_ready(admin.admin, timeout).await {
                Ok(())
            } else {
                eprintln!("ebb: not ready after {}", humantime::format_duration(timeout));
                return ExitCode::FAILURE;
            }
        }
        Command::Ctl { plane, tls, json, command } => {
            return match ebb::control::ctl::run(&plane, &tls, json, command).await {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("ebb ctl: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Run(_)
        | Command::CheckConfig { .. }
        | Command::ControlPlane { .. }
        | Command::Demo(_)
        | Command::DemoApp { .. }
        | Command::Inject { .. } => {
            unreachable!("handled in main")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebb: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ebb demo`: exit 0 only if no request failed.
fn demo(opts: ebb::demo::DemoOptions) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ebb: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = opts.json;
    match rt.block_on(ebb::demo::run(opts)) {
        Ok(outcome) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome).unwrap_or_default());
            } else {
                ebb::demo::print(&outcome);
            }
            if outcome.failed == 0 && outcome.requests > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("ebb demo: {e}");
            ExitCode::from(2)
        }
    }
}

/// `ebb demo-app`: the demo's app until SIGTERM or SIGINT (as PID 1 in a container too: the signal
/// is handled, not left to a default PID 1 ignores).
fn demo_app(h1: SocketAddr, h2: SocketAddr, latency: std::time::Duration, on_term_get: Option<String>) -> ExitCode {
    let Some(rt) = server_runtime() else { return ExitCode::FAILURE };
    rt.block_on(async move {
        let stop = shutdown_signal();
        let opts = ebb::demo::app::AppOptions { latency, size: 512 };
        match ebb::demo::app::start_on(opts, h1, h2).await {
            Ok(app) => println!("demo app: HTTP/1.1 on {}, HTTP/2 and gRPC on {}", app.h1, app.h2),
            Err(e) => {
                eprintln!("ebb demo-app: cannot bind: {e}");
                return ExitCode::from(EXIT_BIND);
            }
        }
        stop.await;
        if let Some(url) = on_term_get {
            // Printed for whoever watches the app's log (the container tests do).
            match ebb::cli::get_url(&url).await {
                Ok(status) => println!("late call GET {url}: {}", status.as_u16()),
                Err(e) => println!("late call GET {url} failed: {e}"),
            }
        }
        ExitCode::SUCCESS
    })
}

/// `ebb inject`: the YAML with Ebb added, on stdout; exit 64 naming the document it cannot inject.
fn inject(file: Option<PathBuf>, o: &ebb::inject::InjectOptions) -> ExitCode {
    use std::io::Read as _;
    let mut text = String::new();
    let read = match file.as_deref().filter(|f| f.as_os_str() != "-") {
        Some(path) => std::fs::read_to_string(path).map(|t| text = t).map_err(|e| format!("{}: {e}", path.display())),
        None => std::io::stdin().read_to_string(&mut text).map(|_| ()).map_err(|e| format!("stdin: {e}")),
    };
    if let Err(e) = read {
        eprintln!("ebb inject: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match ebb::inject::inject(&text, o) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ebb inject: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `ebb control-plane`: serves the mesh file until SIGTERM/SIGINT.
fn control_plane(
    config: PathBuf,
    listen: SocketAddr,
    format: ebb::config::LogFormat,
    level: String,
    security: ebb::command::PlaneSecurityArgs,
) -> ExitCode {
    let log = ebb::config::LogConfig { format, level };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
        eprintln!("ebb: --log-level: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    ebb::telemetry::init_logging(&log);
    let Some(rt) = server_runtime() else { return ExitCode::FAILURE };
    rt.block_on(async move {
        let source = match ebb::control::source::FileSource::start(&config) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ebb: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let socket = match tokio::net::TcpListener::bind(listen).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ebb: cannot bind control-plane on {listen}: {e}");
                return ExitCode::from(EXIT_BIND);
            }
        };
        let addr = socket.local_addr().unwrap_or(listen);
        let security = match &security.ca_dir {
            Some(dir) => match ebb::control::ca::Ca::open(dir, &security.trust_domain) {
                Ok(ca) => {
                    let operators = if security.operators.is_empty() {
                        vec![ebb::control::ca::operator_id(&security.trust_domain)]
                    } else {
                        security.operators.clone()
                    };
                    Some(ebb::control::plane::Security {
                        ca: std::sync::Arc::new(ca),
                        cert_life: security.cert_life,
                        operators,
                        names: security.tls_names.clone(),
                    })
                }
                Err(e) => {
                    eprintln!("ebb: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
            None => {
                tracing::warn!(
                    "No --ca-dir: the control plane runs WITHOUT TLS. It cannot tell one caller from another: \
                     any pod that reaches it can subscribe as a node no one else holds, and MeshAdmin answers \
                     loopback callers only. Give it a CA directory for a mesh that trusts identities."
                );
                None
            }
        };
        let tls = security.is_some();
        let plane = ebb::control::plane::Plane::with_security(&source, security);
        let stop = shutdown_signal();
        tracing::info!(listener = "control-plane", addr = %addr, tls, "Listening");
        tracing::info!("Ready");
        let serve = plane.serve(socket);
        tokio::select! {
            r = serve => {
                if let Err(e) = r {
                    eprintln!("ebb: control plane failed: {e}");
                    return ExitCode::FAILURE;
                }
            }
            _ = stop => tracing::info!("Control plane stopping"),
        }
        ExitCode::SUCCESS
    })
}

/// SIGTERM or SIGINT, the handlers installed before this returns (so a signal sent as soon as the
/// process says it is ready is caught, not fatal); a process that cannot install them runs until killed.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        match handlers {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
}

/// The sidecar config as `ebb run` reads it: file (or embedded defaults), then `EBB_*` variables and flags.
fn load(args: &RunArgs) -> Result<Config, ExitCode> {
    Config::load(args.config.as_deref()).and_then(|c| c.apply(&args.overrides)).map_err(|e| {
        eprintln!("ebb: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `ebb check-config`: the same reading and checks as `ebb run` (or the plane's, for a mesh file), and
/// a summary of what would run; nothing is bound or started.
fn check_config(args: &RunArgs, mesh: Option<&Path>, dump: bool) -> ExitCode {
    if let Some(path) = mesh {
        let checked = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|text| ebb::control::source::MeshConfig::from_yaml(&text).map_err(|e| e.to_string()));
        return match checked {
            Ok(m) => {
                println!("{}: a valid mesh file", path.display());
                for c in &m.clusters {
                    println!(
                        "  cluster {}: {} address(es), {} endpoint(s)",
                        c.name,
                        c.addresses.len(),
                        c.endpoints.len()
                    );
                }
                if let Some(i) = &m.inbound {
                    println!("  inbound policy: max_requests {}", i.max_requests);
                }
                for n in &m.identities {
                    let proof = if n.token_sha256.is_some() { "a bootstrap token" } else { "a certificate only" };
                    println!("  identity {} for node {} (proved by {proof})", n.identity, n.node);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ebb: {}: {e}", path.display());
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let cfg = match load(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if dump {
        return match serde_yaml_ng::to_string(&cfg) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ebb: cannot print the config: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let source = args.config.as_ref().map_or("embedded defaults".to_string(), |p| p.display().to_string());
    println!("{source}: a valid sidecar config");
    for line in cfg.summary() {
        println!("  {line}");
    }
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> ExitCode {
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let captures = (cfg.inbound.enabled || cfg.outbound.enabled).then_some((cfg.inbound.bind, cfg.outbound.bind));
    let config_source = args.config.as_ref().map_or("embedded defaults".to_string(), |p| p.display().to_string());
    let rt = if cfg.workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if cfg.workers > 1 {
            b.worker_threads(cfg.workers);
        }
        b.enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ebb: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Logging and trace export set up first, so that everything after is logged and traced.
        if let Err(e) = ebb::telemetry::init(&cfg.log, &cfg.tracing, &cfg.control_plane.node_id()) {
            ebb::telemetry::init_logging(&cfg.log);
            tracing::warn!(error = %e, "Traces not exported");
        }
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config_source, "Starting");
        let running = match ebb::app::start(cfg).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Cannot start");
                // Also on stderr: logs may go to a collector, an operator runs the command by hand.
                eprintln!("ebb: {e}");
                return ExitCode::from(match e {
                    ebb::app::StartError::Config(_)
                    | ebb::app::StartError::Identity(_)
                    | ebb::app::StartError::Plane(_) => EXIT_CONFIG,
                    ebb::app::StartError::Bind { .. } => EXIT_BIND,
                });
            }
        };
        for (name, addr) in &running.listeners {
            tracing::info!(listener = %name, addr = %addr, "Listening");
        }
        for (name, addr) in [("admin", running.admin), ("telemetry", running.telemetry), ("health", running.health)] {
            if let Some(addr) = addr {
                tracing::info!(listener = name, addr = %addr, "Listening");
            }
        }
        if let Some((inbound, outbound)) = captures {
            // A sidecar started by hand sees nothing until the pod's traffic is redirected to it.
            tracing::info!(
                "The capture listeners see traffic only once `sidecar-init` has written the pod's iptables \
                 rules (inbound TCP to :{}, outbound TCP to :{}, Ebb's UID 1337 exempt); `ebb status` lists \
                 what Ebb holds; `ebb demo` shows a whole mesh draining, no iptables needed",
                inbound.port(),
                outbound.port()
            );
        }
        ebb::app::watch_signals(running.drain.clone());
        tracing::info!("Ready");
        let report = running.exited().await;
        tracing::info!(report = %serde_json::to_string(&report).unwrap_or_default(), "Drain report");
        // The drain's span and the last requests' spans go out before the process does.
        ebb::telemetry::traces::flush(std::time::Duration::from_secs(2)).await;
        ExitCode::SUCCESS
    })
}
