//! The layer rules of `docs/architecture.md`, checked on the code: every `crate::...` path in
//! `src/` (a `use` line or a path written inline; comments aside) must go to a layer its own
//! layer may use. A violation names the file, the line and the rule it breaks.

use std::path::{Path, PathBuf};

/// The layers, lowest first. A layer may use only layers listed before it, and only those
/// [`allowed`] gives.
const ORDER: &[&str] = &[
    "foundation",
    "kernels",
    "imaging",
    "data",
    "synthetic",
    "models",
    "losses",
    "metrics",
    "train",
    "datasets",
    "stages",
    "pipeline",
    "bench",
    "cli",
];

/// Which top-level modules make up each layer. `testkit` stands apart (see [`layer_of`]).
fn layer_of(module: &str) -> Option<&'static str> {
    Some(match module {
        // The crate root re-exports `Error` and `Result`, and holds a test-fixture helper.
        "" | "error" | "io" | "device" | "rng" | "progress" | "Error" | "Result"
        | "hf_tiny_fixture" => "foundation",
        "kernels" => "kernels",
        "imaging" => "imaging",
        "data" => "data",
        "synthetic" => "synthetic",
        "models" => "models",
        "losses" => "losses",
        "metrics" => "metrics",
        "train" => "train",
        "datasets" => "datasets",
        "stages" => "stages",
        "pipeline" => "pipeline",
        "cli" | "main" => "cli",
        "bench" => "bench",
        "testkit" => "testkit",
        _ => return None,
    })
}

/// The layers whose rules narrow "every layer below" (`docs/architecture.md`, "Rules").
const NARROWED: &[(&str, &[&str])] = &[
    ("foundation", &[]),
    ("kernels", &["foundation"]),
    ("imaging", &["foundation", "kernels"]),
    // data never sees the configuration, a model or a stage.
    ("data", &["foundation"]),
    ("synthetic", &["foundation", "imaging", "data"]),
    // models also never use shards, caches or features (see FORBIDDEN).
    ("models", &["foundation", "kernels", "imaging", "data"]),
    // losses and metrics are pure (losses are tensor functions, kernels' among them).
    ("losses", &["foundation", "kernels"]),
    ("metrics", &["foundation"]),
    // train is generic: it never names a model, a dataset or a stage.
    ("train", &["foundation", "kernels", "data"]),
    ("testkit", &["foundation"]),
];

/// What `layer` may use besides itself: as narrowed, else every layer below it; `bench`,
/// every layer below `pipeline` and the test servers.
fn allowed(layer: &str) -> Vec<&'static str> {
    if let Some((_, a)) = NARROWED.iter().find(|(l, _)| *l == layer) {
        return a.to_vec();
    }
    let below = |l: &str| ORDER[..ORDER.iter().position(|o| *o == l).unwrap_or(0)].to_vec();
    if layer == "bench" {
        let mut a = below("pipeline");
        a.push("testkit");
        return a;
    }
    below(layer)
}

/// Paths a layer may not use although their layer is allowed: (layer, path prefix, rule).
const FORBIDDEN: &[(&str, &str, &str)] = &[
    ("models", "data::shard", "models never read shards"),
    ("models", "data::cache", "models never use the cache"),
    (
        "models",
        "data::features",
        "models never read cached features",
    ),
];

/// A broken rule.
#[derive(Debug, PartialEq)]
struct Violation {
    file: String,
    line: usize,
    message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// The module path of a file under `src/` (`stages/ingest/cc.rs` → `stages::ingest::cc`).
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b` path on `line` (also `$crate::`), as its segments.
fn crate_paths(line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `prefcap_crate::` and the like
        }
        let segments: Vec<String> = rest
            .split("::")
            .map_while(|s| {
                let name: String = s
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                (!name.is_empty()).then_some(name)
            })
            .collect();
        if !segments.is_empty() {
            out.push(segments);
        }
    }
    out
}

/// The rules' verdict on one file: `relative` is its path under `src/`.
fn check_file(relative: &Path, text: &str) -> Vec<Violation> {
    let module = module_path(relative);
    let top = module.first().map_or("", String::as_str);
    let Some(layer) = layer_of(top) else {
        return vec![Violation {
            file: relative.display().to_string(),
            line: 0,
            message: format!(
                "module `{top}` belongs to no layer; add it to docs/architecture.md and this test"
            ),
        }];
    };
    let allowed = allowed(layer);
    let mut out = Vec::new();
    let mut in_tests = false;
    let mut cfg_test = false;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if cfg_test && (trimmed.contains("mod tests") || trimmed.contains("mod test ")) {
            // Test modules close their files: everything after is test code.
            in_tests = true;
        }
        cfg_test = trimmed.starts_with("#[cfg(test)]") || (cfg_test && trimmed.is_empty());
        for path in crate_paths(line) {
            let target = path[0].as_str();
            let mut violation = |message: String| {
                out.push(Violation {
                    file: relative.display().to_string(),
                    line: i + 1,
                    message,
                })
            };
            let Some(target_layer) = layer_of(target) else {
                violation(format!("`crate::{}` is in no layer", path.join("::")));
                continue;
            };
            if target_layer == layer {
                // Within a layer, a stage never uses another stage: only the registry, the
                // context and its own files.
                if layer == "stages" && path.len() > 1 && module.len() > 1 {
                    let (own, used) = (module[1].as_str(), path[1].as_str());
                    let shared = [
                        "context",
                        "Stage",
                        "StageContext",
                        "Registered",
                        "STAGES",
                        "parse",
                        "parse_section",
                        "stage",
                        "Outcome",
                    ];
                    if used != own && !shared.contains(&used) {
                        violation(format!(
                            "stage `{own}` uses stage `{used}` (`crate::{}`): stages share files through the context, never code",
                            path.join("::")
                        ));
                    }
                }
                continue;
            }
            if target_layer == "testkit" && in_tests {
                continue; // the test servers and the NumPy reader are for tests
            }
            if !allowed.contains(&target_layer) {
                violation(format!(
                    "layer `{layer}` uses layer `{target_layer}` (`crate::{}`), which it may not",
                    path.join("::")
                ));
                continue;
            }
            let joined = path.join("::");
            for (l, prefix, rule) in FORBIDDEN {
                if *l == layer && (joined == *prefix || joined.starts_with(&format!("{prefix}::")))
                {
                    violation(format!("`crate::{joined}`: {rule}"));
                }
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
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
fn the_rules_only_let_a_layer_use_layers_below_it() {
    for layer in ORDER.iter().chain(&["testkit"]) {
        let at = ORDER.iter().position(|l| l == layer);
        for used in &allowed(layer) {
            let below = match (ORDER.iter().position(|l| l == used), at) {
                (Some(u), Some(a)) => u < a,
                // testkit stands apart: only bench (and tests) may use it; it uses the foundation.
                _ => *used == "testkit" || *layer == "testkit",
            };
            assert!(below, "`{layer}` may use `{used}`, which is not below it");
        }
    }
}

#[test]
fn every_import_in_src_keeps_the_layer_rules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 40, "{} files under src/", files.len());
    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        if relative == Path::new("lib.rs") {
            continue; // declares the modules
        }
        let text = std::fs::read_to_string(file).unwrap();
        violations.extend(check_file(relative, &text));
    }
    assert!(
        violations.is_empty(),
        "{} import(s) break docs/architecture.md's layer rules:\n{}",
        violations.len(),
        violations
            .iter()
            .map(|v| format!("  {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The checker itself: each kind of violation is caught and named.
#[test]
fn the_checker_names_file_line_and_rule() {
    let v = check_file(
        Path::new("data/shard.rs"),
        "//! doc crate::stages\nuse crate::error::Result;\nuse crate::stages::StageContext;\n",
    );
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].file.as_str(), v[0].line), ("data/shard.rs", 3));
    assert!(
        v[0].message.contains("`data` uses layer `stages`"),
        "{}",
        v[0]
    );

    let v = check_file(
        Path::new("stages/generate.rs"),
        "use crate::stages::context::ClipConfig;\nuse crate::stages::{Stage, StageContext};\n\
         fn f() { crate::stages::train_sft::TrainSft::run(); }\n",
    );
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].line, 3);
    assert!(
        v[0].message
            .contains("stage `generate` uses stage `train_sft`"),
        "{}",
        v[0]
    );

    let v = check_file(
        Path::new("models/clip/mod.rs"),
        "use crate::data::hub::HubClient;\nuse crate::data::features::FeatureKey;\n",
    );
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].message.contains("never read cached features"),
        "{}",
        v[0]
    );

    // The test servers: fine in a test module, not in the library.
    let text = "use crate::testkit::npy::read_npy;\n#[cfg(test)]\nmod tests {\n    use crate::testkit::loopback::MockHub;\n}\n";
    let v = check_file(Path::new("imaging/jpeg.rs"), text);
    assert_eq!(v.iter().map(|v| v.line).collect::<Vec<_>>(), [1]);
    assert!(check_file(Path::new("bench/mod.rs"), text).is_empty());

    let v = check_file(Path::new("stages/mod.rs"), "use crate::pipeline::Config;\n");
    assert!(
        v[0].message.contains("`stages` uses layer `pipeline`"),
        "{}",
        v[0]
    );
    assert!(check_file(Path::new("widgets/x.rs"), "")[0]
        .message
        .contains("belongs to no layer"));
}
