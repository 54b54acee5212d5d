//! The `pipeline` command line (clap). Parses arguments and calls into the library.

use std::path::PathBuf;

#[cfg(feature = "bench")]
use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[cfg(feature = "bench")]
use crate::bench;
use crate::data::store::open_workdir;
use crate::datasets::embedding::{embed_user_inputs, UserInputs};
use crate::pipeline::plan::{self, ConfigSource};
use crate::pipeline::runner::{self, RunOptions};
use crate::pipeline::workers;
use crate::stages::{self, STAGES};

#[derive(Debug, Parser)]
#[command(
    name = "pipeline",
    version,
    about = "prefcap: preference-aligned image captioning, one dataflow pipeline"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a stage or a pipeline (default: the embedded offline demo, pipelines/default.toml).
    Run(RunArgs),
    /// Check a job array's shards (`run <stage> --num-workers N`) and record the stage as one
    /// run; fails naming each missing shard and the worker index that owns it.
    Merge(JobArgs),
    /// Where a job array stands: shards finished per set, worker outcomes, what is missing.
    Status(JobArgs),
    /// List stages and pipelines.
    List,
    /// Validate a pipeline and its configuration without running anything.
    Validate {
        /// Pipeline name (pipelines/<name>.toml), path to a .toml, or a stage name.
        pipeline: String,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Embed your own images and/or texts with `[clip]`'s model into the feature cache, optionally
    /// exporting them to a Parquet or Arrow file.
    Embed(EmbedArgs),
    /// Score any model's captions against references (BLEU-1..4, ROUGE-L, CIDEr-D as
    /// pycocoevalcap computes them): COCO-format JSON, JSONL or Parquet with image_id, caption.
    Score {
        /// References: any number of captions per image_id.
        #[arg(long, value_name = "FILE")]
        refs: PathBuf,
        /// Candidates: one caption per image_id.
        #[arg(long, value_name = "FILE")]
        cands: PathBuf,
        /// Also write per-image scores as CSV.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Tables, charts and index.html (captions beside their images) of runs under the
    /// workdir, side by side (polars).
    Report {
        /// Directory that holds runs/.
        #[arg(long, default_value = ".")]
        workdir: PathBuf,
        /// Where to write the tables, charts and page [default: WORKDIR/report].
        #[arg(long)]
        out: Option<PathBuf>,
        /// The run ids to compare [default: every run under WORKDIR/runs].
        #[arg(long, num_args = 1..)]
        runs: Vec<String>,
        /// Held-out images in the page's gallery (0 = all).
        #[arg(long, default_value_t = 256)]
        gallery_images: usize,
    },
    /// Benchmarks against the Python tools prefcap replaces (a build with `--features bench`).
    #[cfg(feature = "bench")]
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Stage (ingest, embed, ...) or pipeline (name in pipelines/, or a path to a .toml).
    #[arg(default_value = "default")]
    pub target: String,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Re-download only the failed samples of finished shards.
    #[arg(long)]
    pub retry_failed: bool,
    /// Split a shard-parallel stage (ingest, embed, sample-pairs) across N workers of a job
    /// array: shard s belongs to worker s mod N. Always give it explicitly.
    #[arg(long, value_name = "N")]
    pub num_workers: Option<u32>,
    /// This worker's index in 0..N [default: $SLURM_ARRAY_TASK_ID, else $JOB_COMPLETION_INDEX].
    #[arg(long, value_name = "I")]
    pub worker_index: Option<u32>,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    /// The stage the workers ran.
    pub stage: String,
    /// How many workers the job array had (names the owner of each missing shard).
    #[arg(long, value_name = "N")]
    pub num_workers: u32,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A folder of images (searched recursively) or a file listing image paths, one per line.
    #[arg(long, value_name = "PATH")]
    pub images: Option<PathBuf>,
    /// A text file, one text per line.
    #[arg(long, value_name = "FILE")]
    pub texts: Option<PathBuf>,
    /// CLIP model: a hub repo id, a local Hugging Face directory, or `tiny` [default: clip.model].
    #[arg(long, value_name = "DIR-or-REPO")]
    pub model: Option<String>,
    /// Hub revision of --model [default: clip.revision].
    #[arg(long)]
    pub revision: Option<String>,
    /// Reproduce transformers' `pil` or `torchvision` image preprocessing [default:
    /// clip.image_backend, else as the checkpoint's preprocessor_config.json says].
    #[arg(long, value_name = "pil|torchvision")]
    pub image_backend: Option<crate::imaging::preprocess::ImageBackend>,
    /// Also write all embeddings to this file (`.parquet`, or Arrow IPC for any other name).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Configuration file [default: configs/default.toml, else the built-in copy].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one configuration key, e.g. --set ingest.cc.shard_size=500 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Directory that holds data/, cache/ and runs/; or an object store (s3://bucket/prefix,
    /// gs://, az://, file://) for data/ and job ledgers, credentials from the environment.
    #[arg(long, default_value = ".")]
    pub workdir: PathBuf,
    /// Run model stages on this CUDA device (needs a build with `--features cuda`).
    #[arg(long, value_name = "N")]
    pub gpu: Option<usize>,
}

impl CommonArgs {
    fn source(&self) -> ConfigSource {
        ConfigSource {
            path: self.config.clone(),
            sets: self.sets.clone(),
            gpu: self.gpu,
        }
    }
}

/// Keeps freed tensor buffers in the heap instead of returning each to the kernel: model
/// stages allocate and free multi-megabyte buffers every layer, and with glibc's default
/// thresholds each one is a fresh mmap that faults in zeroed pages (15% of CLIP's CPU time).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let plan = plan::resolve(&args.target, &args.common.source())?;
            let (root, workdir) = open_workdir(&args.common.workdir)?;
            let opts = RunOptions {
                workdir,
                retry_failed: args.retry_failed,
                gpu: args.common.gpu,
                root,
            };
            let env = |name: &str| std::env::var(name).ok();
            match workers::resolve_workers(args.num_workers, args.worker_index, env)? {
                Some(w) => {
                    let (path, record) = workers::run_worker(&plan, &opts, w)?;
                    println!(
                        "worker {} of {} finished ({}); record in {}; once every worker has \
                         ended: pipeline merge {} --num-workers {}",
                        record.index, record.count, record.summary, path, args.target, record.count
                    );
                }
                None => {
                    let (run_dir, record) = runner::execute(&plan, &opts)?;
                    println!(
                        "run {} finished; record in {}",
                        record.run_id,
                        run_dir.join("run.json").display()
                    );
                }
            }
        }
        Command::Merge(args) => {
            let plan = plan::resolve(&args.stage, &args.common.source())?;
            let (root, workdir) = open_workdir(&args.common.workdir)?;
            let (path, record) = workers::merge(&plan, &root, &workdir, args.num_workers)?;
            println!(
                "{} merged as run {}; record in {path}",
                args.stage, record.run_id
            );
        }
        Command::Status(args) => {
            let plan = plan::resolve(&args.stage, &args.common.source())?;
            let (root, workdir) = open_workdir(&args.common.workdir)?;
            let (registered, ledger) = workers::job(&plan, &root, &workdir)?;
            println!(
                "{}",
                workers::job_status(registered.name, &ledger, args.num_workers)?
            );
        }
        Command::List => {
            println!("stages:");
            for s in STAGES {
                println!("  {:<13} {}", s.name, s.description);
            }
            println!("pipelines:");
            for (name, description, origin) in list_pipelines() {
                println!("  {name:<13} {description}  ({origin})");
            }
        }
        Command::Validate { pipeline, common } => {
            let plan = plan::resolve(&pipeline, &common.source())?;
            println!("{} ({}): valid", plan.name, plan.origin);
            for step in &plan.steps {
                let inputs = if step.inputs.is_empty() {
                    String::new()
                } else {
                    format!(" <- {}", step.inputs.join(", "))
                };
                println!("  {}{inputs}", step.name());
            }
        }
        Command::Embed(args) => {
            let mut sets = args.common.sets.clone();
            if let Some(m) = &args.model {
                sets.push(format!("clip.model={}", toml::Value::String(m.clone())));
            }
            if let Some(r) = &args.revision {
                sets.push(format!("clip.revision={}", toml::Value::String(r.clone())));
            }
            if let Some(b) = args.image_backend {
                let name = toml::Value::try_from(b).expect("a unit variant is a TOML string");
                sets.push(format!("clip.image_backend={name}"));
            }
            let source = ConfigSource {
                sets,
                ..args.common.source()
            };
            let plan = plan::resolve("embed", &source)?;
            let embed = plan.config.stage::<stages::embed::Embed>()?;
            let mut ctx = plan.config.context(&args.common.workdir, "embed");
            ctx.gpu = args.common.gpu;
            let inputs = UserInputs {
                images: args.images.clone(),
                texts: args.texts.clone(),
                out: args.out.clone(),
            };
            let summary = embed_user_inputs(
                &ctx.feature_identity(&ctx.clip)?,
                &ctx.device()?,
                &ctx.workdir,
                &inputs,
                &ctx.embed_options(embed.batch_size),
            )?;
            println!("{}", summary.embed);
            for entry in &summary.entries {
                println!(
                    "  {} {}: {} rows in {}",
                    entry.manifest.key.modality,
                    entry.manifest.key.source,
                    entry.manifest.rows,
                    entry.path.display()
                );
            }
            if let Some(out) = &args.out {
                println!("exported to {}", out.display());
            }
        }
        Command::Score { refs, cands, out } => {
            let (corpus, per) = stages::score::score_files(&refs, &cands)?;
            for (metric, value) in &corpus {
                println!("{metric:<10} {value:.6}");
            }
            if let Some(out) = out {
                let mut csv =
                    String::from("image_id,bleu_1,bleu_2,bleu_3,bleu_4,meteor,rouge_l,cider_d\n");
                for (id, t) in &per {
                    csv.push_str(&format!(
                        "{},{},{},{},{},{},{},{}\n",
                        id.replace(',', " "),
                        t.bleu[0],
                        t.bleu[1],
                        t.bleu[2],
                        t.bleu[3],
                        t.meteor,
                        t.rouge_l,
                        t.cider_d
                    ));
                }
                crate::io::write_atomic(&out, csv.as_bytes())?;
                println!("per-image scores in {}", out.display());
            }
        }
        Command::Report {
            workdir,
            out,
            runs,
            gallery_images,
        } => {
            let out = out.unwrap_or_else(|| workdir.join("report"));
            let s = crate::stages::report::report(&workdir, &out, &runs, gallery_images)?;
            println!("{}", s.text(&out));
        }
        #[cfg(feature = "bench")]
        Command::Bench { which } => bench::run(which).context("benchmark failed")?,
    }
    Ok(())
}

/// Pipelines in `pipelines/` plus the built-in ones not shadowed by a file.
fn list_pipelines() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("pipelines") {
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let description = std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| toml::from_str::<plan::PipelineFile>(&t).ok())
                .map_or_else(
                    || "(does not parse; run `pipeline validate`)".into(),
                    |f| f.description,
                );
            out.push((name, description, p.display().to_string()));
        }
    }
    for (name, text) in plan::BUILTIN_PIPELINES {
        if !out.iter().any(|(n, _, _)| n == name) {
            let description = toml::from_str::<plan::PipelineFile>(text)
                .map(|f| f.description)
                .unwrap_or_default();
            out.push((name.to_string(), description, "built-in".into()));
        }
    }
    out
}
