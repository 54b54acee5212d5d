//! Helpers shared by the integration tests.

#[allow(dead_code)] // not every test file serves hub datasets
pub mod hub_fixtures;

use std::path::Path;
use std::process::{Command, Output};

/// Runs the real `pipeline` binary in `cwd`; returns its output and a printable transcript
/// (command, stdout, stderr) for assertion messages.
#[allow(dead_code)] // not every test file runs the binary
pub fn pipeline(args: &[&str], cwd: &Path) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .current_dir(cwd)
        .env("PREFCAP_QUIET", "1")
        .output()
        .unwrap();
    let text = transcript(args, &out);
    (out, text)
}

/// A printable transcript of `pipeline ARGS` and its output, for assertion messages.
pub fn transcript(args: &[&str], out: &Output) -> String {
    format!(
        "$ pipeline {}\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The newest run directory under `work/runs`: the one that started last (run ids begin
/// with their pipeline's name, so not the last by name).
#[allow(dead_code)] // not every test file looks at runs
pub fn newest_run(work: &Path) -> std::path::PathBuf {
    let mut runs: Vec<_> = std::fs::read_dir(work.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    runs.sort_by_key(|r| {
        let name = r.file_name().unwrap().to_string_lossy().into_owned();
        (prefcap::stages::context::run_started(&name), name)
    });
    runs.pop().unwrap()
}

/// The strings of a JSON array (a reference file's `texts`).
#[allow(dead_code)] // not every test file reads references
pub fn strings(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect()
}

/// A tool a test needs, as the caller found it: its path, or `None` (skip) with the reason
/// printed; under CI (`CI` set) a missing tool fails the test, since `.ci/run` installs it.
#[allow(dead_code)] // not every test file needs an outside tool
pub fn needed_tool(what: &str, found: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("{what} is missing; .ci/run installs it")
        }
        None => {
            eprintln!("skipped: {what} is not installed (.ci/run installs it)");
            None
        }
    }
}
