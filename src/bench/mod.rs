//! `pipeline bench ...`: throughput and memory of prefcap stages side by side with the Python
//! tools they replace, measured in the same run on the same inputs. Peers are installed into
//! a local venv (`.bench/venv`) on first use. Never run by CI.

pub mod embed;
pub mod ingest_s3;
pub mod score;
pub mod train_contrastive;
pub mod train_dico;
pub mod train_diffusion;
pub mod train_dpo;
pub mod train_rlhf;
pub mod train_sft;
pub mod train_story;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::imaging::resize::encode_jpeg;
use crate::rng::SplitMix64;
use crate::testkit::loopback::{LoopbackServer, Reply};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Download -> decode -> resize -> shard from a loopback image server, vs img2dataset.
    Ingest(BenchIngestArgs),
    /// CLIP ViT-B/32 (real size, random weights) image embeddings, vs HF transformers (PyTorch).
    Embed(crate::bench::embed::BenchEmbedArgs),
    /// BLEU/ROUGE-L/CIDEr-D on N candidate/reference sets, vs pycocoevalcap.
    Score(crate::bench::score::BenchScoreArgs),
    /// Captioner training steps with a GPT-2-small-size decoder, vs PyTorch.
    TrainSft(crate::bench::train_sft::BenchTrainSftArgs),
    /// DPO epochs on text-only pairs with a GPT-2-small-size policy, vs TRL's DPOTrainer.
    TrainDpo(crate::bench::train_dpo::BenchTrainDpoArgs),
    /// Contrastive stage-1 steps with a GPT-2-small-size text encoder, vs PyTorch.
    TrainContrastive(crate::bench::train_contrastive::BenchTrainContrastiveArgs),
    /// DiCO steps (beam candidates, CLIP reward, policy + reference) with a GPT-2-small-size captioner, vs PyTorch.
    TrainDico(crate::bench::train_dico::BenchTrainDicoArgs),
    /// RLHF steps (sampled captions, CLIP dense + reward-model sparse reward, RLOO) with GPT-2-small-size models, vs PyTorch.
    TrainRlhf(crate::bench::train_rlhf::BenchTrainRlhfArgs),
    /// Caption diffusion model steps at DiffuSeq-base size, vs PyTorch.
    TrainDiffusion(crate::bench::train_diffusion::BenchTrainDiffusionArgs),
    /// Next-frame story model steps (fusion encoder, prefix, GPT-2-small-size decoder, image head), vs PyTorch.
    TrainStory(crate::bench::train_story::BenchTrainStoryArgs),
}

#[derive(Debug, Args)]
pub struct BenchIngestArgs {
    /// Images per run.
    #[arg(long, default_value_t = 2000)]
    pub images: usize,
    /// Also run prefcap on this many times the images, to show peak RSS stays flat (1 = skip).
    #[arg(long, default_value_t = 10)]
    pub scale: usize,
    /// Distinct source JPEGs served (URLs are all distinct).
    #[arg(long, default_value_t = 32)]
    pub distinct: usize,
    /// Source image size, WIDTHxHEIGHT.
    #[arg(long, default_value = "640x480")]
    pub source_size: String,
    /// Processes (img2dataset) and worker threads (prefcap).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Downloads in flight (prefcap) / threads per process (img2dataset).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Skip img2dataset (measure prefcap alone).
    #[arg(long)]
    pub no_peer: bool,
    /// Skip the job-array row (--workers worker processes writing to a local S3 server,
    /// moto's, installed into --venv).
    #[arg(long)]
    pub no_s3: bool,
    /// Scratch directory for inputs and outputs.
    #[arg(long, default_value = ".bench/ingest")]
    pub dir: PathBuf,
    /// Virtual environment for the Python peer.
    #[arg(long, default_value = ".bench/venv")]
    pub venv: PathBuf,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Ingest(args) => bench_ingest(&args),
        BenchCommand::Embed(args) => crate::bench::embed::bench_embed(&args),
        BenchCommand::Score(args) => crate::bench::score::bench_score(&args),
        BenchCommand::TrainSft(args) => crate::bench::train_sft::bench_train_sft(&args),
        BenchCommand::TrainDpo(args) => crate::bench::train_dpo::bench_train_dpo(&args),
        BenchCommand::TrainDico(args) => crate::bench::train_dico::bench_train_dico(&args),
        BenchCommand::TrainRlhf(args) => crate::bench::train_rlhf::bench_train_rlhf(&args),
        BenchCommand::TrainDiffusion(args) => {
            crate::bench::train_diffusion::bench_train_diffusion(&args)
        }
        BenchCommand::TrainStory(args) => crate::bench::train_story::bench_train_story(&args),
        BenchCommand::TrainContrastive(args) => {
            crate::bench::train_contrastive::bench_train_contrastive(&args)
        }
    }
}

/// Creates the bench's scratch directory and returns it canonical, with the thread count
/// (`threads`, or every core when 0).
pub(crate) fn scratch_and_threads(dir: &Path, threads: usize) -> anyhow::Result<(PathBuf, usize)> {
    std::fs::create_dir_all(dir)?;
    let threads = if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(2, usize::from)
    };
    Ok((dir.canonicalize()?, threads))
}

/// This binary re-run as `pipeline bench <bench> <flags> --dir DIR --worker-out OUT` (with
/// `--gpu` when given), on `threads` threads: a bench's prefcap side in its own process, so
/// its memory (host RSS, the GPU's pool) is its own and gone before the peer starts.
pub(crate) fn worker_command(
    bench: &str,
    flags: &[(&str, usize)],
    dir: &Path,
    out: &Path,
    threads: usize,
    gpu: Option<usize>,
) -> anyhow::Result<Command> {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["bench", bench]);
    for (flag, value) in flags {
        cmd.arg(flag).arg(value.to_string());
    }
    cmd.arg("--dir")
        .arg(dir)
        .arg("--worker-out")
        .arg(out)
        .env("RAYON_NUM_THREADS", threads.to_string());
    if let Some(g) = gpu {
        cmd.args(["--gpu", &g.to_string()]);
    }
    Ok(cmd)
}

/// `--source-size WIDTHxHEIGHT`.
pub(crate) fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    s.split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .with_context(|| format!("--source-size {s}: expected WIDTHxHEIGHT"))
}

/// Resource use of one measured child process tree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measured {
    pub wall: f64,
    /// User + system CPU seconds of the process and its reaped children.
    pub cpu: f64,
    /// Peak of the summed resident memory of the process tree, in MiB (sampled every 20 ms).
    pub peak_rss_mib: f64,
    /// With a CUDA device: peak device memory in use above what was in use at the start,
    /// in MiB ([`GpuPeak`]); `None` without a device or without `nvidia-smi`.
    pub peak_gpu_mib: Option<f64>,
}

/// Peak memory in use on CUDA device `gpu` while something runs, above what was in use when
/// sampling started: one `nvidia-smi` reporting every 50 ms, for the whole device. Each
/// tool's allocator counts as it holds memory: PyTorch keeps freed blocks cached, candle's
/// CUDA pool returns them at each synchronisation, so a short candle peak between two samples
/// can be missed. Nothing else should run on the device.
pub(crate) struct GpuPeak {
    smi: std::process::Child,
    reader: Option<std::thread::JoinHandle<Option<(f64, f64)>>>,
}

impl GpuPeak {
    /// `None` without a device or when `nvidia-smi` cannot be started.
    pub(crate) fn start(gpu: Option<usize>) -> Option<Self> {
        use std::io::BufRead;
        let mut smi = Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "50",
                "-i",
                &gpu?.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let out = smi.stdout.take()?;
        // (first sample, peak): the first line arrives at once.
        let reader = std::thread::spawn(move || {
            base_and_peak(std::io::BufReader::new(out).lines().map_while(Result::ok))
        });
        Some(Self {
            smi,
            reader: Some(reader),
        })
    }

    /// Stops sampling: the peak in MiB above the first sample.
    pub(crate) fn finish(mut self) -> Option<f64> {
        let _ = self.smi.kill();
        let _ = self.smi.wait();
        let (base, peak) = self.reader.take()?.join().ok()??;
        Some(peak - base)
    }
}

impl Drop for GpuPeak {
    /// An early return (the measured side failed) stops `nvidia-smi` too.
    fn drop(&mut self) {
        let _ = self.smi.kill();
        let _ = self.smi.wait();
    }
}

/// The first and the largest figure of `nvidia-smi`'s samples (lines it cannot parse, such as
/// `[N/A]`, skipped after the first, which must parse).
fn base_and_peak(mut lines: impl Iterator<Item = String>) -> Option<(f64, f64)> {
    let base = parse_mib(&lines.next()?)?;
    let peak = lines.filter_map(|l| parse_mib(&l)).fold(base, f64::max);
    Some((base, peak))
}

/// `nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits` output: MiB.
fn parse_mib(out: &str) -> Option<f64> {
    out.lines().next()?.trim().parse().ok()
}

/// The optional GPU figure of a table row: `-` without one.
pub(crate) fn gpu_mib(m: Option<f64>) -> String {
    m.map_or("-".into(), |v| format!("{v:.0}"))
}

fn bench_ingest(args: &BenchIngestArgs) -> anyhow::Result<()> {
    let (w, h) = parse_size(&args.source_size)?;
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.canonicalize()?;
    let images: Vec<Arc<Vec<u8>>> = (0..args.distinct.max(1))
        .map(|i| source_jpeg(i as u64, w, h).map(Arc::new))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let avg_kib =
        images.iter().map(|i| i.len()).sum::<usize>() as f64 / images.len() as f64 / 1024.0;
    let served = images.clone();
    let server = LoopbackServer::start(Arc::new(move |req| {
        let idx = req
            .path
            .strip_prefix("/img/")
            .and_then(|p| p.strip_suffix(".jpg"))
            .and_then(|n| n.parse::<usize>().ok());
        match idx {
            Some(i) => Reply::shared(served[i % served.len()].clone(), "image/jpeg"),
            None => Reply::status(404),
        }
    }))?;
    eprintln!(
        "serving {} distinct {w}x{h} JPEGs (avg {avg_kib:.0} KiB) at {}",
        images.len(),
        server.base_url()
    );

    let mut rows = Vec::new();
    let ours = run_prefcap(args, &dir, &server, args.images, "x1")?;
    rows.push(("prefcap".to_string(), args.images, ours));
    if args.scale > 1 {
        let n = args.images * args.scale;
        let big = run_prefcap(args, &dir, &server, n, &format!("x{}", args.scale))?;
        rows.push((format!("prefcap (x{})", args.scale), n, big));
    }
    if !args.no_s3 {
        let s3 = crate::bench::ingest_s3::run_workers(args, &dir, &server, args.images)?;
        rows.push((format!("prefcap {}w -> S3", args.workers), args.images, s3));
    }
    if !args.no_peer {
        let peer = run_img2dataset(args, &dir, &server)?;
        rows.push(("img2dataset".to_string(), args.images, peer));
    }

    println!(
        "\n{:<18} {:>8} {:>9} {:>10} {:>9} {:>15} {:>13}",
        "tool", "images", "wall s", "images/s", "cpu s", "img/s per core", "peak RSS MiB"
    );
    for (tool, n, m) in &rows {
        println!(
            "{tool:<18} {n:>8} {:>9.2} {:>10.1} {:>9.2} {:>15.1} {:>13.1}",
            m.wall,
            *n as f64 / m.wall,
            m.cpu,
            *n as f64 / m.cpu.max(1e-9),
            m.peak_rss_mib
        );
    }
    if let Some((_, n, peer)) = rows.iter().find(|(t, _, _)| t == "img2dataset") {
        let per_core = |n: usize, m: &Measured| n as f64 / m.cpu.max(1e-9);
        println!(
            "\nper-core throughput ratio prefcap / img2dataset: {:.2}x (wall-clock ratio {:.2}x)",
            per_core(args.images, &ours) / per_core(*n, peer),
            (args.images as f64 / ours.wall) / (*n as f64 / peer.wall)
        );
    }
    if let Some((_, _, s3)) = rows.iter().find(|(t, _, _)| t.ends_with("-> S3")) {
        println!(
            "aggregate images/s, {} worker processes -> S3 (moto) / 1 process -> local disk: \
             {:.1} / {:.1} = {:.2}x",
            args.workers,
            args.images as f64 / s3.wall,
            args.images as f64 / ours.wall,
            ours.wall / s3.wall
        );
    }
    if let Some((_, _, big)) = rows.get(1).filter(|_| args.scale > 1) {
        println!(
            "peak RSS x1 -> x{}: {:.1} -> {:.1} MiB",
            args.scale, ours.peak_rss_mib, big.peak_rss_mib
        );
    }
    Ok(())
}

/// A deterministic photo-like JPEG: smooth low-frequency colour fields, a few hard-edged
/// objects and mild sensor noise, so it compresses like a photo (~1.5-2.5 bits per pixel at
/// quality 90) rather than like noise, which would make the benchmark a Huffman-decoding test.
pub(crate) fn source_jpeg(seed: u64, w: u32, h: u32) -> Result<Vec<u8>, String> {
    let mut rng = SplitMix64::derived(seed, "bench-image");
    let mut waves = [[0f32; 4]; 9];
    for wave in &mut waves {
        *wave = [
            (rng.unit_f64() * 6.0) as f32,
            (rng.unit_f64() * 6.0) as f32,
            (rng.unit_f64() * 6.3) as f32,
            (rng.unit_f64() * 60.0) as f32,
        ];
    }
    let objects: Vec<(f32, f32, f32, [f32; 3])> = (0..6)
        .map(|_| {
            let (cx, cy) = (
                rng.unit_f64() as f32 * w as f32,
                rng.unit_f64() as f32 * h as f32,
            );
            let r = (0.05 + rng.unit_f64() * 0.2) as f32 * w as f32;
            (
                cx,
                cy,
                r,
                [
                    rng.below(256) as f32,
                    rng.below(256) as f32,
                    rng.below(256) as f32,
                ],
            )
        })
        .collect();
    let mut px = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
            let noise = (rng.next_u64() % 9) as f32 - 4.0;
            let mut rgb = [0f32; 3];
            for (c, value) in rgb.iter_mut().enumerate() {
                *value = 128.0
                    + waves[c * 3..c * 3 + 3]
                        .iter()
                        .map(|[fx, fy, ph, amp]| {
                            amp * (std::f32::consts::TAU * (fx * u + fy * v) + ph).sin()
                        })
                        .sum::<f32>();
            }
            for (cx, cy, r, colour) in &objects {
                if (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) < r * r {
                    rgb = *colour;
                }
            }
            px.extend(rgb.map(|c| (c + noise).clamp(0.0, 255.0) as u8));
        }
    }
    encode_jpeg(&px, w, h, 90, true)
}

pub(crate) fn write_tsv(
    path: &Path,
    server: &LoopbackServer,
    n: usize,
    header: bool,
) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    if header {
        writeln!(f, "caption\turl")?;
    }
    for i in 0..n {
        writeln!(
            f,
            "a synthetic benchmark photo number {i}\t{}",
            server.url(&format!("/img/{i}.jpg"))
        )?;
    }
    Ok(f.flush()?)
}

fn run_prefcap(
    args: &BenchIngestArgs,
    dir: &Path,
    server: &LoopbackServer,
    n: usize,
    tag: &str,
) -> anyhow::Result<Measured> {
    let tsv = dir.join(format!("input-{tag}.tsv"));
    write_tsv(&tsv, server, n, false)?;
    let work = dir.join(format!("prefcap-{tag}"));
    let _ = std::fs::remove_dir_all(&work);
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["run", "ingest", "--workdir"])
        .arg(&work)
        .env("PREFCAP_QUIET", "1");
    for set in [
        "ingest.sources=[\"cc\"]".to_string(),
        format!("ingest.cc.input={}", tsv.display()),
        "ingest.cc.shard_size=1000".into(),
        format!("ingest.cc.concurrency={}", args.concurrency),
        format!("run.workers={}", args.workers),
        "ingest.cc.retries=0".into(),
    ] {
        cmd.arg("--set").arg(set);
    }
    eprintln!("prefcap ingest of {n} images ...");
    measure(cmd, "prefcap", None)
}

fn run_img2dataset(
    args: &BenchIngestArgs,
    dir: &Path,
    server: &LoopbackServer,
) -> anyhow::Result<Measured> {
    ensure_venv(&args.venv, &["img2dataset"], "import img2dataset")?;
    let bin = args.venv.join("bin/img2dataset");
    let tsv = dir.join("input-img2dataset.tsv");
    write_tsv(&tsv, server, args.images, true)?;
    let out = dir.join("img2dataset-out");
    let _ = std::fs::remove_dir_all(&out);
    let mut cmd = Command::new(bin);
    cmd.arg("--url_list")
        .arg(&tsv)
        .arg("--output_folder")
        .arg(&out);
    for (k, v) in [
        ("--input_format", "tsv".to_string()),
        ("--url_col", "url".into()),
        ("--caption_col", "caption".into()),
        ("--output_format", "parquet".into()),
        ("--processes_count", args.workers.to_string()),
        ("--thread_count", args.concurrency.to_string()),
        ("--image_size", "224".into()),
        ("--resize_mode", "center_crop".into()),
        ("--encode_quality", "95".into()),
        ("--number_sample_per_shard", "1000".into()),
        ("--timeout", "10".into()),
        ("--retries", "0".into()),
        ("--enable_wandb", "False".into()),
        // prefcap does not extract EXIF; both compute sha256 of the stored image.
        ("--extract_exif", "False".into()),
    ] {
        cmd.arg(k).arg(v);
    }
    eprintln!("img2dataset of {} images ...", args.images);
    measure(cmd, "img2dataset", None)
}

/// The Python of `venv` with `packages` installed from PyPI (creating the venv and
/// installing on first use); `probe` is an import line that must succeed afterwards.
pub(crate) fn ensure_venv(venv: &Path, packages: &[&str], probe: &str) -> anyhow::Result<PathBuf> {
    let python = venv.join("bin/python");
    let works = |py: &Path| {
        Command::new(py)
            .args(["-c", probe])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if python.is_file() && works(&python) {
        return Ok(python);
    }
    eprintln!(
        "installing {} into {} ...",
        packages.join(", "),
        venv.display()
    );
    let created = python.is_file()
        || Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(venv)
            .status()?
            .success();
    let installed = created
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(packages)
            .status()?
            .success();
    if !installed || !works(&python) {
        bail!(
            "could not install {} into {}",
            packages.join(", "),
            venv.display()
        );
    }
    Ok(python)
}

/// A caption batch of `rows` × `len` uniformly random token ids below `vocab`, all real,
/// with random `clip_dim`-wide image features in [-1, 1) (seed 0): what the caption trainers'
/// benches step on.
pub(crate) fn random_caption_batch(
    rows: usize,
    len: usize,
    vocab: u64,
    clip_dim: usize,
) -> crate::datasets::captions::CaptionBatch {
    let mut rng = SplitMix64::new(0);
    crate::datasets::captions::CaptionBatch {
        rows,
        len,
        clip: (0..rows * clip_dim)
            .map(|_| (rng.unit_f64() * 2.0 - 1.0) as f32)
            .collect(),
        ids: (0..rows * len).map(|_| rng.below(vocab) as u32).collect(),
        mask: vec![1.0; rows * len],
    }
}

/// The flags every training bench shares.
#[derive(Debug, Clone, Args)]
pub struct TrainBenchArgs {
    /// CPU threads for both tools; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Run both tools on this CUDA device (prefcap needs `--features cuda`).
    #[arg(long)]
    pub gpu: Option<usize>,
    /// Skip PyTorch (measure prefcap alone).
    #[arg(long)]
    pub no_peer: bool,
    /// Scratch directory (random checkpoints, the peer's script and results).
    #[arg(long, default_value = ".bench/train")]
    pub dir: PathBuf,
    /// Virtual environment for the Python peer (torch, transformers).
    #[arg(long, default_value = ".bench/venv")]
    pub venv: PathBuf,
    /// Internal: run prefcap's side in this process and write its figures here.
    #[arg(long, hide = true)]
    pub worker_out: Option<PathBuf>,
}

impl TrainBenchArgs {
    /// Where the bench runs: `--gpu`'s CUDA device, or the CPU with `threads` threads.
    pub fn on(&self, threads: usize) -> String {
        match self.gpu {
            Some(g) => format!("CUDA device {g}, f32"),
            None => format!("CPU, {threads} thread(s), f32"),
        }
    }
}

/// One side's figures of a training bench: its parameters, optimizer steps per second and
/// first loss, as both sides write them (JSON).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct StepFigures {
    pub params: usize,
    pub steps_per_s: f64,
    pub first_loss: f64,
}

impl StepFigures {
    /// Times `steps` training steps of `objective` on one fixed `batch` (after a first step,
    /// whose loss is kept, and a warm-up step), as every training bench does.
    pub fn measure<O: crate::train::Objective>(
        objective: &mut O,
        batch: &O::Batch,
        steps: usize,
        params: usize,
    ) -> anyhow::Result<Self> {
        let mut trainer = crate::train::Trainer::new(objective.groups())?;
        let first_loss = trainer.step(objective, batch, 0, 1)?.losses[0];
        trainer.step(objective, batch, 1, 1)?;
        let start = Instant::now();
        for step in 0..steps {
            trainer.step(objective, batch, step, steps)?;
        }
        Ok(Self {
            params,
            steps_per_s: steps as f64 / start.elapsed().as_secs_f64(),
            first_loss,
        })
    }

    pub fn read(path: &Path, who: &str) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{who} wrote no result"))?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// Prints a training bench's table: `unit`/s (`per_step` of them per optimizer step), first
/// loss, peak RSS and parameters of prefcap and, when it ran, PyTorch, with the ratios.
pub(crate) fn print_step_table(
    unit: &str,
    per_step: f64,
    ours: &StepFigures,
    ours_mem: &Measured,
    peer: Option<&Side>,
) {
    let rate = format!("{unit}/s");
    println!(
        "{:<10} {rate:>12} {:>12} {:>14} {:>10}",
        "tool", "first loss", "peak RSS MiB", "params"
    );
    let row = |tool: &str, s: &StepFigures, m: &Measured| {
        println!(
            "{tool:<10} {:>12.3} {:>12.4} {:>14.0} {:>10}",
            s.steps_per_s * per_step,
            s.first_loss,
            m.peak_rss_mib,
            s.params
        );
    };
    row("prefcap", ours, ours_mem);
    if let Some((theirs, mem)) = peer {
        row("PyTorch", theirs, mem);
        println!(
            "\nratio prefcap / PyTorch: {rate} {:.2}x, peak RSS {:.2}x",
            ours.steps_per_s / theirs.steps_per_s,
            ours_mem.peak_rss_mib / mem.peak_rss_mib
        );
    }
}

/// What every PyTorch peer script ends with: two untimed steps of its `step()` (the first
/// one's loss reported), `steps` timed ones, and the figures written to `out` as JSON.
const PEER_TIMING: &str = r#"
first = step()
step()
if device.type == "cuda":
    torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(steps):
    step()
if device.type == "cuda":
    torch.cuda.synchronize()
json.dump({"steps_per_s": steps / (time.perf_counter() - t0), "first_loss": first,
           "params": sum(p.numel() for p in params)}, open(out, "w"))
"#;

/// One side's figures and measured resource use.
pub(crate) type Side = (StepFigures, Measured);

/// prefcap's side of a training bench in a child process (`pipeline bench <name> flags...
/// --worker-out`) and, unless `--no-peer`, the PyTorch peer (its name, script and
/// checkpoint, [`TorchPeer`]) with `peer_args`: both sides' figures and measured resource use.
pub(crate) fn step_bench(
    name: &str,
    flags: &[(&str, usize)],
    common: &TrainBenchArgs,
    (dir, threads): (&Path, usize),
    (peer, script, ckpt): (&str, &str, &Path),
    peer_args: &[usize],
) -> anyhow::Result<(StepFigures, Measured, Option<Side>)> {
    let ours_out = dir.join(format!("prefcap-{name}.json"));
    let cmd = worker_command(name, flags, dir, &ours_out, threads, common.gpu)?;
    let ours_mem = measure(cmd, &format!("prefcap {name}"), common.gpu)?;
    let ours = StepFigures::read(&ours_out, "prefcap")?;
    let theirs = if common.no_peer {
        None
    } else {
        let peer = TorchPeer {
            venv: &common.venv,
            dir,
            name: peer,
            script,
            ckpt,
            threads,
            gpu: common.gpu,
        };
        let (out, mem) = peer.run(peer_args)?;
        Some((StepFigures::read(&out, "PyTorch")?, mem))
    };
    Ok((ours, ours_mem, theirs))
}

/// A PyTorch peer: `script` (written to `dir/<name>.py`, [`PEER_TIMING`] appended) run by the
/// venv's Python with torch and transformers, as `script ckpt out threads args...`, on `gpu`
/// or the CPU with `threads` threads; it writes its JSON figures to `dir/<name>.json`.
pub(crate) struct TorchPeer<'a> {
    pub venv: &'a Path,
    pub dir: &'a Path,
    pub name: &'a str,
    pub script: &'a str,
    pub ckpt: &'a Path,
    pub threads: usize,
    pub gpu: Option<usize>,
}

impl TorchPeer<'_> {
    /// Runs the peer with `args` after the thread count; returns its JSON file and the
    /// process's measured resource use.
    pub fn run(&self, args: &[usize]) -> anyhow::Result<(PathBuf, Measured)> {
        let python = ensure_venv(
            self.venv,
            &["torch", "transformers", "safetensors"],
            "import torch, transformers",
        )?;
        let path = self.dir.join(format!("{}.py", self.name));
        std::fs::write(&path, format!("{}{PEER_TIMING}", self.script))?;
        let out = self.dir.join(format!("{}.json", self.name));
        let _ = std::fs::remove_file(&out);
        eprintln!("PyTorch ...");
        let mut cmd = Command::new(&python);
        cmd.arg(&path)
            .arg(self.ckpt)
            .arg(&out)
            .arg(self.threads.to_string())
            .args(args.iter().map(usize::to_string))
            .env("OMP_NUM_THREADS", self.threads.to_string())
            .env(
                "PEER_DEVICE",
                self.gpu.map_or("cpu".into(), |g| format!("cuda:{g}")),
            );
        let mem = measure(cmd, "PyTorch", self.gpu)?;
        Ok((out, mem))
    }
}

/// Runs `cmd` to completion, sampling the resident memory of its whole process tree (and,
/// with `gpu`, the device's memory in use).
pub(crate) fn measure(
    mut cmd: Command,
    what: &str,
    gpu: Option<usize>,
) -> anyhow::Result<Measured> {
    cmd.stdout(std::process::Stdio::null());
    let gpu_peak = GpuPeak::start(gpu);
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let pid = child.id() as i32;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(tree_rss_bytes(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let mut status = 0;
    // SAFETY: plain FFI call; `usage` is a valid out-parameter and `pid` is our child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    let peak_gpu_mib = gpu_peak.and_then(GpuPeak::finish);
    if r < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{what} failed (wait status {status})");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    // Not `ru_maxrss`: a spawned child's high-water mark starts from the parent's memory
    // (the child shares or copies it until exec), so it reports the benchmark's own size.
    let peak_rss_mib = peak as f64 / (1024.0 * 1024.0);
    Ok(Measured {
        wall,
        cpu,
        peak_rss_mib,
        peak_gpu_mib,
    })
}

/// Summed RSS of `root` and all its descendants, from /proc.
fn tree_rss_bytes(root: i32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut parent = std::collections::HashMap::new();
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
            continue;
        };
        if let Some(ppid) = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok())
        {
            parent.insert(pid, ppid);
        }
    }
    let page = 4096u64;
    let in_tree = |mut p: i32| {
        while p > 1 {
            if p == root {
                return true;
            }
            p = *parent.get(&p).unwrap_or(&0);
        }
        false
    };
    parent
        .keys()
        .filter(|p| in_tree(**p))
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/statm")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|r| r.parse::<u64>().ok())
        })
        .map(|pages| pages * page)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_memory_figures_parse_and_print() {
        assert_eq!(parse_mib("1234\n"), Some(1234.0));
        assert_eq!(parse_mib("  81559 \n17\n"), Some(81559.0));
        assert_eq!(parse_mib("[N/A]\n"), None);
        assert_eq!(parse_mib(""), None);
        assert_eq!(gpu_mib(Some(1536.4)), "1536");
        assert_eq!(gpu_mib(None), "-");
        assert!(GpuPeak::start(None).is_none());
        let lines = |v: &[&str]| {
            v.iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .into_iter()
        };
        assert_eq!(
            base_and_peak(lines(&["500", "2600", "[N/A]", "1800"])),
            Some((500.0, 2600.0))
        );
        assert_eq!(base_and_peak(lines(&["700"])), Some((700.0, 700.0)));
        assert_eq!(base_and_peak(lines(&["No devices were found"])), None);
        assert_eq!(base_and_peak(lines(&[])), None);
    }
}
