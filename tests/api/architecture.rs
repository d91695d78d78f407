//! The layering rules, checked on the source text (comments aside):
//!
//! - `users` and `enrichment` never reach into each other: they share only
//!   `crate::events` and the bus;
//! - the modules import no composition code (`app`, `startup`);
//! - the web layer (`web`) imports no module and no composition code;
//! - the infrastructure imports none of the above.
//!
//! So the arrows run startup -> app -> modules -> web -> infrastructure. This fails
//! the build of the rule, not of the code.

use std::path::{Path, PathBuf};

const MODULES: [&str; 2] = ["users", "enrichment"];
const COMPOSITION: [&str; 2] = ["app", "startup"];
const INFRASTRUCTURE: [&str; 10] = [
    "bus",
    "cache",
    "config",
    "crypto",
    "db",
    "events",
    "metrics",
    "outbox",
    "resilience",
    "telemetry",
];

/// Every `.rs` file of the top-level module `name` (a folder or a single file).
fn files_of(name: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let file = src.join(format!("{name}.rs"));
    if file.is_file() {
        return vec![file];
    }
    let mut files = Vec::new();
    let mut folders = vec![src.join(name)];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    assert!(!files.is_empty(), "no sources for {name}");
    files
}

/// The code of a file without its comments (a doc line may name any module).
fn code_of(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_does_not_use(layer: &str, others: &[&str]) {
    for file in files_of(layer) {
        let code = code_of(&file);
        for other in others {
            for needle in [format!("crate::{other}"), format!("super::super::{other}")] {
                assert!(
                    !code.contains(&needle),
                    "{} uses {needle}: see the layering rules in tests/api/architecture.rs",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn users_does_not_use_enrichment() {
    assert_does_not_use("users", &["enrichment"]);
}

#[test]
fn enrichment_does_not_use_users() {
    assert_does_not_use("enrichment", &["users"]);
}

#[test]
fn modules_import_no_composition_code() {
    for module in MODULES {
        assert_does_not_use(module, &COMPOSITION);
    }
}

#[test]
fn the_web_layer_imports_no_module_and_no_composition_code() {
    assert_does_not_use("web", &[MODULES.as_slice(), &COMPOSITION].concat());
}

#[test]
fn the_infrastructure_imports_no_layer_above_it() {
    let above = [MODULES.as_slice(), &COMPOSITION, &["web"]].concat();
    for layer in INFRASTRUCTURE {
        assert_does_not_use(layer, &above);
    }
}

#[test]
fn every_top_level_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known: Vec<&str> = [
        MODULES.as_slice(),
        &COMPOSITION,
        &["web"],
        &INFRASTRUCTURE,
        &["lib", "main"],
    ]
    .concat();
    for entry in std::fs::read_dir(src).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let name = name.strip_suffix(".rs").unwrap_or(&name).to_owned();
        assert!(
            known.contains(&name.as_str()),
            "src/{name} is in no layer: add it to tests/api/architecture.rs"
        );
    }
}
