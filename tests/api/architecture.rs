//! The module rule: `users` and `enrichment` never reach into each other. They share
//! only `crate::events` and the bus. This fails the build of the rule, not of the code.

use std::path::Path;

fn sources_of(module: &str) -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(module);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            files.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
    assert!(!files.is_empty(), "no sources in {}", dir.display());
    files
}

fn assert_does_not_use(module: &str, other: &str) {
    for (file, source) in sources_of(module) {
        for needle in [format!("crate::{other}"), format!("super::super::{other}")] {
            assert!(
                !source.contains(&needle),
                "{file} uses {needle}: modules talk only through events"
            );
        }
    }
}

#[test]
fn users_does_not_use_enrichment() {
    assert_does_not_use("users", "enrichment");
}

#[test]
fn enrichment_does_not_use_users() {
    assert_does_not_use("enrichment", "users");
}
