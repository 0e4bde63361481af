//! Replays fuzzing inputs through the very harness the cargo-fuzz targets run
//! (`fuzz/src/lib.rs`, included below), so that `cargo test` guards them forever:
//!
//! - `fuzz/regressions/<target>/*`: minimised inputs that once crashed a target; each
//!   must pass once its bug is fixed;
//! - `fuzz/seeds/<target>/*`: the seed inputs, which keep the harness itself honest.
//!
//! See fuzz/README.md for running the fuzzers and saving a new crash.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

/// Runs every file of `dir/<target>/` through its target and fails with the list of the
/// inputs that panicked, each with its panic message.
fn replay(dir: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return 0; // Nothing saved yet.
    };
    let mut failures = Vec::new();
    let mut count = 0;
    let mut subdirs: Vec<_> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    subdirs.sort();
    for sub in subdirs {
        let name = sub.file_name().unwrap().to_string_lossy().into_owned();
        let Some((_, target)) = harness::TARGETS.iter().find(|(t, _)| *t == name) else {
            panic!("{dir}/{name}: no fuzz target of that name");
        };
        let mut files: Vec<_> = std::fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).unwrap();
            count += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(&data))) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {message}", file.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} input(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    count
}

#[test]
fn saved_fuzz_crashes_no_longer_crash() {
    replay("fuzz/regressions");
}

#[test]
fn fuzz_seeds_pass_the_harness() {
    replay("fuzz/seeds");
}
