//! The `ebb` command: the proxy (`run`, the default) and the operator commands that talk to it.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// mimalloc when built with `--features mimalloc` (see BENCHMARKS.md for what it changes).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ebb::config::{Config, Overrides};

/// Exit code for a configuration error (EX_USAGE… no: sysexits EX_DATAERR is 65; we use 64 by design).
const EXIT_CONFIG: u8 = 64;
/// Exit code when a port cannot be bound (sysexits EX_UNAVAILABLE).
const EXIT_BIND: u8 = 69;

#[derive(Parser, Debug)]
#[command(name = "ebb", version, about = "A service-mesh sidecar proxy whose drain loses nothing")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug, Clone, Default)]
struct RunArgs {
    /// YAML config file; without one Ebb runs on its embedded defaults
    #[arg(long, short = 'c', env = "EBB_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

#[derive(clap::Args, Debug, Clone)]
struct AdminArg {
    /// Address of the local Ebb's admin API
    #[arg(long, env = "EBB_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default)
    Run(Box<RunArgs>),
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
    Demo(Box<ebb::demo::DemoOptions>),
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
        log_format: ebb::config::LogFormat,
        /// Log filter
        #[arg(long, env = "EBB_LOG", default_value = "info")]
        log_level: String,
    },
    /// Operate the mesh through the reference control plane
    Ctl {
        /// The control plane's gRPC address
        #[arg(long, env = "EBB_PLANE_ADDR", default_value = "http://127.0.0.1:15010")]
        plane: String,
        /// Print JSON instead of tables
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: ebb::control::ctl::CtlCommand,
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

/// Longest `ebb wait-ready --timeout`: a deadline is `now + timeout`, which must not overflow.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

fn wait_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > MAX_WAIT {
        return Err(format!("at most {}", humantime::format_duration(MAX_WAIT)));
    }
    Ok(d)
}

fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// The operator subcommands keep clap's own exit codes; a bad flag of `ebb run` is a config error.
const OPERATOR_COMMANDS: [&str; 7] = ["drain", "status", "wait-ready", "help", "ctl", "control-plane", "demo"];

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
        Some(Command::ControlPlane { config, listen, log_format, log_level }) => {
            control_plane(config, listen, log_format, log_level)
        }
        Some(Command::Demo(opts)) => demo(*opts),
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
        Command::Drain { admin, wait, timeout, scope, now, exit } => {
            let o = ebb::cli::DrainOptions { wait, timeout, scope, now, exit };
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
        Command::Ctl { plane, json, command } => {
            return match ebb::control::ctl::run(&plane, json, command).await {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("ebb ctl: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Run(_) | Command::ControlPlane { .. } | Command::Demo(_) => unreachable!("handled in main"),
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

/// `ebb control-plane`: serves the mesh file until SIGTERM/SIGINT.
fn control_plane(config: PathBuf, listen: SocketAddr, format: ebb::config::LogFormat, level: String) -> ExitCode {
    let log = ebb::config::LogConfig { format, level };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
        eprintln!("ebb: --log-level: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    ebb::telemetry::init_logging(&log);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ebb: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
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
        let plane = ebb::control::plane::Plane::new(&source);
        tracing::info!(listener = "control-plane", addr = %addr, "Listening");
        tracing::info!("Ready");
        let serve = plane.serve(socket);
        tokio::select! {
            r = serve => {
                if let Err(e) = r {
                    eprintln!("ebb: control plane failed: {e}");
                    return ExitCode::FAILURE;
                }
            }
            _ = shutdown_signal() => tracing::info!("Control plane stopping"),
        }
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

fn run(args: RunArgs) -> ExitCode {
    let cfg = match Config::load(args.config.as_deref()).and_then(|c| c.apply(&args.overrides)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ebb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
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
        let running = match ebb::app::start(cfg).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Cannot start");
                // Also on stderr: logs may go to a collector, an operator runs the command by hand.
                eprintln!("ebb: {e}");
                return ExitCode::from(match e {
                    ebb::app::StartError::Config(_) => EXIT_CONFIG,
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
        tracing::info!("Ready");
        ebb::app::watch_signals(running.drain.clone());
        let report = running.exited().await;
        tracing::info!(report = %serde_json::to_string(&report).unwrap_or_default(), "Drain report");
        // The drain's span and the last requests' spans go out before the process does.
        ebb::telemetry::traces::flush(std::time::Duration::from_secs(2)).await;
        ExitCode::SUCCESS
    })
}
