//! sidecar-init: redirects a pod's TCP traffic to the Ebb proxy with iptables, then exits.
#![forbid(unsafe_code)]

mod config;
mod rules;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};

use clap::Parser;

use config::Config;
use rules::Family;

/// sysexits.h EX_USAGE, so that callers can tell bad flags from iptables failures.
const EX_USAGE: u8 = 64;

/// Why running iptables-save or iptables-restore failed.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{doing}: cannot run {}: {source}", program.display())]
    Spawn { doing: String, program: PathBuf, source: std::io::Error },
    #[error("copying {} to {}: {source}", from.display(), to.display())]
    Install { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("{doing}: {} failed ({status}){stderr}", program.display())]
    Failed {
        doing: String,
        program: PathBuf,
        status: ExitStatus,
        /// `: ` and the child's stderr, or empty if it said nothing.
        stderr: String,
    },
}

fn main() -> ExitCode {
    let cfg = match Config::try_parse() {
        Ok(cfg) => cfg,
        Err(e) => {
            // Nothing more useful can be done if stderr is gone.
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EX_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    match run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidecar-init: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: &Config) -> Result<(), Error> {
    let families: &[Family] = if cfg.ipv6 { &[Family::V4, Family::V6] } else { &[Family::V4] };
    // Read every table before writing any, so that a failed read leaves the pod untouched.
    let mut inputs = Vec::new();
    for &family in families {
        let (name, save, restore) = match family {
            Family::V4 => ("IPv4", &cfg.iptables_save, &cfg.iptables_restore),
            Family::V6 => ("IPv6", &cfg.ip6tables_save, &cfg.ip6tables_restore),
        };
        let doing = format!("reading the {name} nat table");
        let saved = match exec(&doing, save, &["-t", "nat"], None) {
            Ok(saved) => saved,
            // A dry run is often a preview on a machine where iptables-save cannot run.
            Err(e) if cfg.dry_run => {
                eprintln!("sidecar-init: {e}; showing the input for an empty nat table");
                String::new()
            }
            Err(e) => return Err(e),
        };
        let input = if cfg.cleanup { rules::cleanup(&saved) } else { rules::render(cfg, family, &saved) };
        inputs.push((restore, name, input));
    }
    for (restore, name, input) in inputs {
        if cfg.dry_run {
            print!("# {} --noflush\n{input}", restore.display());
        } else {
            let doing = format!("applying the {name} rules");
            exec(&doing, restore, &["--noflush"], Some(&input))?;
        }
    }
    if let (Some(to), false) = (&cfg.install_ebb, cfg.dry_run) {
        install(&cfg.ebb, to)?;
    }
    Ok(())
}

/// Copies the `ebb` binary into the shared volume, executable by every user (the app's preStop runs
/// as the app's user). Written beside the target and renamed, so a restarted init container never
/// leaves half a binary where the preStop will run it.
fn install(from: &Path, to: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| Error::Install { from: from.to_owned(), to: to.to_owned(), source };
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    std::fs::rename(&tmp, to).map_err(err)
}

/// Runs `program`, feeding it `stdin`, and returns its stdout if it succeeds.
fn exec(doing: &str, program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let spawn_error = |source| Error::Spawn { doing: doing.to_owned(), program: program.to_owned(), source };
    let piped = if stdin.is_some() { Stdio::piped() } else { Stdio::null() };
    let mut child = Command::new(program)
        .args(args)
        .stdin(piped)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    // The pipe is closed at the end of this statement, which is what lets the child finish.
    let written = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => pipe.write_all(input.as_bytes()),
        _ => Ok(()),
    };
    let output = child.wait_with_output().map_err(spawn_error)?;
    // A child that refuses its input may exit before reading it all; its stderr says why.
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        return Err(Error::Failed {
            doing: doing.to_owned(),
            program: program.to_owned(),
            status: output.status,
            stderr: if stderr.is_empty() { String::new() } else { format!(": {stderr}") },
        });
    }
    written.map_err(spawn_error)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
