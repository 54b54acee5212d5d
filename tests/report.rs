//! The report from the outside, on one small run whose last step fails: the report step still
//! runs on what finished; the engine's TensorBoard event files read back with the
//! `tensorboard` package match `metrics.parquet`; `index.html` holds the tables, a chart per
//! training step (one with a single validation too), and a gallery entry per held-out image
//! with every model's caption, escaped; it renders in headless Chromium (every image decodes
//! and is not blank, the "captions that differ" filter works); `pipeline report --runs A B`
//! compares two runs.
//!
//! Python's `tensorboard` and Chromium come from `.ci/run` (`PREFCAP_TEST_PYTHON`,
//! `/usr/bin/chromium`); where they are missing the checks that need them are skipped with a
//! printed reason, except under CI, where they fail.

mod common;
use common::{newest_run, pipeline};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use prefcap::data::records::{GenerationRow, ImageTextSample, MetricRow, ScoreRow, SummaryRow};
use prefcap::data::shard::{read_parquet, write_parquet, ShardSet};

const FAILING_PIPELINE: &str = r#"
description = "test: a training step, then a step that fails; the report still runs"

[[steps]]
stage = "ingest"

[[steps]]
stage = "pretrain-clip"
config = { steps = 4 }

[[steps]]
stage = "score"
inputs = ["pretrain-clip"]

[[steps]]
stage = "report"
inputs = ["score"]
"#;

/// A tool the test needs: its path, or `None` (skip, or fail under CI).
fn tool(what: &str, path: Option<PathBuf>) -> Option<PathBuf> {
    common::needed_tool(what, path.filter(|p| p.is_file()))
}

fn python() -> Option<PathBuf> {
    tool(
        "Python with the tensorboard package (PREFCAP_TEST_PYTHON)",
        std::env::var_os("PREFCAP_TEST_PYTHON").map(PathBuf::from),
    )
}

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PREFCAP_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    tool("Chromium", Some(path))
}

/// Runs headless Chromium on `page` with `args` (as the machine's probe does: no sandbox as
/// root, no background networking on a closed network, a fresh profile).
fn headless(chromium: &Path, page: &Path, args: &[&str], profile: &Path) -> String {
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Appended to a copy of the page: on load, checks what the browser rendered and writes it
/// as JSON into `<pre id="browser-check">`.
const BROWSER_CHECK: &str = r#"<script>
window.addEventListener('load', function () {
  var imgs = [].slice.call(document.querySelectorAll('img'));
  var res = {images: imgs.length, broken: 0, blank: 0,
    charts: document.querySelectorAll('figure.chart img').length,
    entries: document.querySelectorAll('#gallery .entry').length,
    captions: document.querySelectorAll('#gallery tr.caption').length,
    tables: document.querySelectorAll('table.report-table').length};
  imgs.forEach(function (im) {
    if (!im.complete || im.naturalWidth === 0) { res.broken++; return; }
    var c = document.createElement('canvas');
    c.width = im.naturalWidth; c.height = im.naturalHeight;
    var x = c.getContext('2d'); x.drawImage(im, 0, 0);
    var d = x.getImageData(0, 0, c.width, c.height).data, seen = {};
    for (var i = 0; i < d.length; i += 4 * 3) { seen[d[i] + ',' + d[i + 1] + ',' + d[i + 2]] = 1; }
    if (Object.keys(seen).length < 3) res.blank++;
  });
  document.getElementById('differ-only').click();
  res.shown_when_differ = [].filter.call(document.querySelectorAll('#gallery .entry'),
    function (e) { return e.offsetParent !== null; }).length;
  res.counter = document.getElementById('shown').textContent;
  var pre = document.createElement('pre');
  pre.id = 'browser-check'; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script>"#;

/// Captions with everything the page must escape, including the replacement character an
/// untrained model's invalid UTF-8 becomes.
const NASTY: &str = "<b>a \"red\" & 'blue'</b> ünïcödé \u{FFFD}\u{FFFD}";

/// Writes two models' captions of the first three held-out images into run `run`: the
/// first image captioned alike by both, the others differently.
fn write_captions(work: &Path, run: &Path) -> Vec<String> {
    let val = ShardSet::new(work, "synthetic", "val");
    let samples: Vec<ImageTextSample> = val.read(val.finished().unwrap()[0]).unwrap();
    let keys: Vec<String> = samples.iter().take(3).map(|s| s.key.clone()).collect();
    let run_id = run.file_name().unwrap().to_string_lossy().into_owned();
    let mut gens = Vec::new();
    let mut scores = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        for model in ["untrained", "train-sft"] {
            let caption = match (i, model) {
                (0, _) => "a red circle left of a blue square".to_string(),
                (_, "untrained") => NASTY.to_string(),
                _ => format!("caption {i} of {model}"),
            };
            gens.push(GenerationRow {
                run_id: run_id.clone(),
                model: model.into(),
                method: "greedy".into(),
                dataset: "synthetic".into(),
                split: "val".into(),
                image_key: key.clone(),
                caption: caption.clone(),
                logprob: -1.0,
                tokens: 5,
            });
            scores.push(ScoreRow {
                run_id: run_id.clone(),
                model: model.into(),
                method: "greedy".into(),
                image_key: key.clone(),
                caption,
                bleu_1: 0.5,
                bleu_2: 0.4,
                bleu_3: 0.3,
                bleu_4: 0.2,
                meteor: 0.3,
                rouge_l: 0.4,
                cider_d: 1.25 + i as f64,
                clip_score: Some(2.0),
                ref_clip_score: Some(1.3),
                attribute_accuracy: Some(0.8),
                bertscore_p: None,
                bertscore_r: None,
                bertscore_f1: None,
            });
        }
    }
    let summary: Vec<SummaryRow> = ["untrained", "train-sft"]
        .iter()
        .enumerate()
        .flat_map(|(i, model)| {
            [
                ("CIDEr", 0.1 + 4.0 * i as f64),
                ("CLIPScore", 0.5 + i as f64),
            ]
            .map(|(metric, value)| SummaryRow {
                run_id: run_id.clone(),
                model: model.to_string(),
                method: "greedy".into(),
                metric: metric.into(),
                value,
            })
        })
        .collect();
    write_parquet(&run.join("generations.parquet"), &gens).unwrap();
    write_parquet(&run.join("scores.parquet"), &scores).unwrap();
    write_parquet(&run.join("scores_summary.parquet"), &summary).unwrap();
    keys
}

#[test]
fn a_run_whose_step_fails_gets_a_report_page_that_renders_in_a_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    std::fs::write(work.join("fail.toml"), FAILING_PIPELINE).unwrap();
    let (out, log) = pipeline(
        &[
            "run",
            "fail.toml",
            "--set",
            "clip.model=tiny",
            "--set",
            "ingest.synthetic.train_images=64",
        ],
        work,
    );
    // The score step fails (nothing generated); the report still runs on what finished.
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("Error: stage `score` failed"), "{log}");
    assert!(log.contains("step report: done"), "{log}");
    let run = newest_run(work);
    let run_id = run.file_name().unwrap().to_string_lossy().into_owned();
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    let outcomes: Vec<(&str, &str)> = record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_str().unwrap(), s[1]["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("ingest", "done"),
            ("pretrain-clip", "done"),
            ("score", "failed"),
            ("report", "done")
        ]
    );
    // The printed tables: the run id once, at most 100 columns.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let printed =
        &stderr[stderr.find("step report: done").unwrap()..stderr.find("index.html").unwrap()];
    assert_eq!(
        printed.matches(&format!("run {run_id}\n")).count(),
        1,
        "{printed}"
    );
    assert!(
        printed.lines().all(|l| l.chars().count() <= 104),
        "{printed}"
    );
    let page = run.join("report/index.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.contains("<td class=\"failed\">failed</td>"),
        "the failed step shows"
    );
    assert!(html.contains("no generations.parquet"), "with its error");
    // pretrain-clip validated once: its loss chart still has the single validation point.
    for ext in ["png", "svg"] {
        assert!(run
            .join(format!("report/loss-{run_id}-pretrain-clip.{ext}"))
            .is_file());
    }

    // TensorBoard's own reader sees every metric row of the run.
    if let Some(python) = python() {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/tensorboard_scalars.py");
        let out = Command::new(python)
            .arg(script)
            .arg(run.join("tensorboard"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let events: BTreeMap<String, BTreeMap<String, Vec<(i64, f64)>>> =
            serde_json::from_slice(&out.stdout).unwrap();
        let metrics: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
        assert!(metrics.len() >= 10);
        let mut matched = 0;
        for m in &metrics {
            let tag = prefcap::train::tensorboard::tag(&m.split, &m.name);
            let points = &events[&m.stage][&tag];
            let hit = points
                .iter()
                .find(|(s, _)| *s == m.step)
                .unwrap_or_else(|| panic!("{tag} at step {}: {points:?}", m.step));
            assert!(
                (hit.1 - m.value).abs() <= 1e-6 * m.value.abs().max(1.0),
                "{tag}: {} vs {}",
                hit.1,
                m.value
            );
            matched += 1;
        }
        let events_total: usize = events.values().flat_map(|t| t.values()).map(Vec::len).sum();
        assert_eq!(matched, events_total, "no event without its metric row");
    }

    // Captions of two models, then the report of the run: a gallery entry per image.
    let keys = write_captions(work, &run);
    let (out, log) = pipeline(
        &[
            "report",
            "--runs",
            &run_id,
            "--out",
            "page",
            "--gallery-images",
            "0",
        ],
        work,
    );
    assert!(out.status.success(), "{log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().all(|l| l.chars().count() <= 100), "{stdout}");
    assert!(stdout.trim_end().ends_with("index.html"), "{stdout}");
    let page = work.join("page/index.html");
    let html = std::fs::read_to_string(&page).unwrap();
    for key in &keys {
        assert_eq!(
            html.matches(&format!("data-key=\"{key}\"")).count(),
            1,
            "{key}"
        );
    }
    assert_eq!(html.matches("data-differ=\"1\">").count(), 2);
    assert_eq!(html.matches("data-differ=\"0\">").count(), 1);
    assert_eq!(
        html.matches("<tr class=\"caption\">").count(),
        6,
        "two models × three images"
    );
    assert_eq!(
        html.matches("data:image/jpeg;base64,").count(),
        3,
        "a thumbnail each"
    );
    assert!(
        !html.contains(NASTY) && !html.contains("<b>a"),
        "captions are escaped"
    );
    assert_eq!(
        html.matches(
            "&lt;b&gt;a &quot;red&quot; &amp; &#39;blue&#39;&lt;/b&gt; ünïcödé \u{FFFD}\u{FFFD}"
        )
        .count(),
        2
    );
    assert!(work.join("page/scores.png").is_file() && work.join("page/scores.svg").is_file());

    if let Some(chromium) = chromium() {
        let checked = work.join("page/check.html");
        std::fs::write(
            &checked,
            html.replace("</body>", &format!("{BROWSER_CHECK}</body>")),
        )
        .unwrap();
        let profile = work.join("chromium-profile");
        let dom = headless(&chromium, &checked, &["--dump-dom"], &profile);
        let start = dom
            .find("<pre id=\"browser-check\">")
            .expect("the check ran")
            + 24;
        let json = &dom[start..start + dom[start..].find("</pre>").unwrap()];
        let res: serde_json::Value = serde_json::from_str(json).unwrap();
        let charts = html.matches("<figure class=\"chart\">").count();
        assert!(charts >= 2, "the scores chart and pretrain-clip's loss");
        assert_eq!(res["charts"], charts, "{res}");
        assert_eq!(res["images"], charts + 3, "{res}");
        assert_eq!(res["broken"], 0, "{res}");
        assert_eq!(res["blank"], 0, "{res}");
        assert_eq!(
            (res["entries"].as_u64(), res["captions"].as_u64()),
            (Some(3), Some(6))
        );
        assert!(res["tables"].as_u64().unwrap() >= 2, "{res}");
        assert_eq!(
            res["shown_when_differ"], 2,
            "the filter hides the image captioned alike"
        );
        assert_eq!(res["counter"], "2 of 3 images shown");
        // The screenshot shows a page, not a blank window.
        let shot = work.join("page/shot.png");
        headless(
            &chromium,
            &page,
            &[
                "--window-size=1280,2400",
                &format!("--screenshot={}", shot.display()),
            ],
            &profile,
        );
        let img = image::open(&shot).unwrap().to_rgb8();
        let colours: std::collections::HashSet<[u8; 3]> =
            img.pixels().step_by(7).map(|p| p.0).collect();
        assert!(
            colours.len() > 50,
            "{} colours in the screenshot",
            colours.len()
        );
    }

    // Two runs side by side: one row per run and model, the runs numbered once.
    let copy = work.join("runs/copy-20261207T000000-1");
    copy_dir(&run, &copy);
    let renamed = "copy-20261207T000000-1";
    let metrics: Vec<MetricRow> = read_parquet(&copy.join("metrics.parquet")).unwrap();
    let metrics: Vec<MetricRow> = metrics
        .into_iter()
        .map(|m| MetricRow {
            run_id: renamed.into(),
            ..m
        })
        .collect();
    write_parquet(&copy.join("metrics.parquet"), &metrics).unwrap();
    let summary: Vec<SummaryRow> = read_parquet(&copy.join("scores_summary.parquet")).unwrap();
    let summary: Vec<SummaryRow> = summary
        .into_iter()
        .map(|s| SummaryRow {
            run_id: renamed.into(),
            ..s
        })
        .collect();
    write_parquet(&copy.join("scores_summary.parquet"), &summary).unwrap();
    let (out, log) = pipeline(
        &["report", "--runs", &run_id, "copy-20261207T000000-1"],
        work,
    );
    assert!(out.status.success(), "{log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("#1 {run_id}\n#2 copy-20261207T000000-1\n")),
        "{stdout}"
    );
    let scores = std::fs::read_to_string(work.join("report/scores.csv")).unwrap();
    assert_eq!(scores.lines().count(), 1 + 2 * 2, "{scores}");
    let html = std::fs::read_to_string(work.join("report/index.html")).unwrap();
    assert!(html.contains("copy-20261207T000000-1 · train-sft · greedy"));
    let (out, log) = pipeline(&["report", "--runs", "no-such-run"], work);
    assert!(
        !out.status.success() && log.contains("no run `no-such-run`"),
        "{log}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
