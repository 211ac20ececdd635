//! The import graph of `src/` runs one way (docs/architecture.md §2): each top-level module imports only
//! modules below it. In particular the HTTP server, client and bodies know nothing of clusters, retries
//! or breakers: `src/http/` never imports `crate::upstream`, which implements what `http` asks for
//! (a tower service, a body observer). A new import that points up fails here, naming file and line.

use std::path::Path;

/// Top-level modules, lowest first; a module may import those with a lower rank (and itself).
const LAYERS: &[(&str, u8)] = &[
    ("domain", 0),
    ("clock", 0),
    ("limits", 0),
    ("config", 1),
    ("tls", 2),
    ("telemetry", 2),
    ("conntrack", 3),
    ("drain", 4),
    ("transport", 5),
    ("http", 6),
    ("upstream", 7),
    ("proxy", 8),
    ("control", 9),
    ("cli", 9),
    ("inject", 9),
    ("admin", 10),
    ("app", 11),
    ("demo", 12),
    ("command", 13),
];

fn rank(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// The top-level modules a line names through `crate::`, including inside `crate::{a::x, b}`.
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Names at the group's first level: after `{` and after each top-level comma.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_ascii_alphabetic() || c == '_') => {
                        let name: String =
                            group[j..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                        out.push(name);
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect());
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_import_points_down_and_http_never_imports_upstream() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut checked = 0;
    let mut errors = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy();
        let module = top.trim_end_matches(".rs");
        if module == "lib" || module == "main" {
            continue;
        }
        let own =
            rank(module).unwrap_or_else(|| panic!("src/{}: module `{module}` has no place in LAYERS", rel.display()));
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for dep in crate_refs(line) {
                checked += 1;
                if dep == module {
                    continue;
                }
                let Some(r) = rank(&dep) else {
                    errors.push(format!("src/{}:{}: `crate::{dep}` is not in LAYERS", rel.display(), n + 1));
                    continue;
                };
                if r >= own {
                    errors.push(format!(
                        "src/{}:{}: `{module}` (layer {own}) imports `{dep}` (layer {r}), which is not below it",
                        rel.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(checked > 200, "the scan saw the crate's imports ({checked})");
    assert!(errors.is_empty(), "imports that point up:\n{}", errors.join("\n"));
}

#[test]
fn the_scan_reads_grouped_imports_and_would_catch_http_importing_upstream() {
    assert_eq!(crate_refs("use crate::upstream::stack::Route;"), ["upstream"]);
    assert_eq!(crate_refs("use crate::{http::body::X, upstream::{a, b}, limits};"), ["http", "upstream", "limits"]);
    assert_eq!(crate_refs("let x = crate::telemetry::traces::decide(&h);"), ["telemetry"]);
    assert!(rank("upstream") >= rank("http"), "so an `upstream` import in `src/http/` is reported");
}
