//! `pipeline bench embed`: CLIP ViT-B/32 (real size, random weights) image embeddings per
//! second, prefcap (candle) side by side with Hugging Face transformers (PyTorch) on the same
//! checkpoint, inputs, machine and thread count, measured in the same run.
//!
//! Two measurements each: the model alone on preprocessed pixels, and end to end from JPEG
//! files to stored embeddings (decode, preprocess, model, write), the latter with peak RSS
//! of the whole process at 1× and N× the images to show memory stays flat.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use crate::bench::{measure, parse_size, source_jpeg, Measured};
use crate::device::{device_for, ComputeDtype};
use crate::imaging::preprocess::{crop_rgb8, ClipPreprocessConfig, PixelTable};
use crate::models::clip::{ClipEmbedder, ClipModelFiles};
use crate::models::tiny::{ensure_tiny_clip, TinyClipSpec};
use crate::rng::SplitMix64;

#[derive(Debug, Args)]
pub struct BenchEmbedArgs {
    /// Images per end-to-end run (and per model-only measurement).
    #[arg(long, default_value_t = 256)]
    pub images: usize,
    /// Images per model call.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Also run prefcap end to end on this many times the images (1 = skip).
    #[arg(long, default_value_t = 10)]
    pub scale: usize,
    /// CPU threads for both tools; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Model-only measurements per tool, taken in turns (prefcap, transformers, prefcap, …)
    /// so that a noisy machine slows both alike; the medians are compared.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Run both tools on this CUDA device (prefcap needs `--features cuda`).
    #[arg(long)]
    pub gpu: Option<usize>,
    /// Compute precision on a GPU, for both tools: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The GPU's dense f16/bf16 tensor peak in TFLOP/s, for the "% of peak" column
    /// (H100 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    /// Size of the JPEGs of the end-to-end runs, WIDTHxHEIGHT (ingest stores CC images at
    /// 256 on the short side; 640x480 is a typical downloaded photo).
    #[arg(long, default_value = "640x480")]
    pub source_size: String,
    /// Also print where the model's time goes, stage by stage (device synchronised at every
    /// stage boundary, so the stages sum to more than the model-only time).
    #[arg(long)]
    pub profile: bool,
    /// Skip transformers (measure prefcap alone).
    #[arg(long)]
    pub no_peer: bool,
    /// Scratch directory (checkpoint, JPEGs, outputs).
    #[arg(long, default_value = ".bench/embed")]
    pub dir: PathBuf,
    /// Virtual environment for the Python peer (torch, transformers, pillow).
    #[arg(long, default_value = ".bench/venv")]
    pub venv: PathBuf,
}

/// The peer's script: model-only rate, end-to-end run, and its embeddings of shared pixels.
const PEER_SCRIPT: &str = r#"
import json, os, sys, time
import numpy as np, torch
from PIL import Image
from transformers import CLIPVisionModelWithProjection
try:
    from transformers import CLIPImageProcessorPil as Processor
except ImportError:
    from transformers import CLIPImageProcessor as Processor
mode, ckpt, threads, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
device = torch.device(os.environ.get("PEER_DEVICE", "cpu"))
dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[os.environ.get("PEER_DTYPE", "f32")]
torch.set_num_threads(threads)
model = CLIPVisionModelWithProjection.from_pretrained(ckpt, attn_implementation="sdpa").eval().to(device, dtype)
def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()
def embed(px):
    return model(pixel_values=px.to(device, dtype)).image_embeds.float().cpu().numpy()
with torch.inference_mode():
    if mode == "model":
        n, pixels_path, out_path = int(sys.argv[5]), sys.argv[6], sys.argv[7]
        px = torch.from_numpy(np.fromfile(pixels_path, dtype=np.float32).reshape(-1, 3, 224, 224))
        embed(px).astype(np.float32).tofile(out_path)
        x = torch.randn(batch, 3, 224, 224).to(device, dtype)
        for _ in range(3):
            model(pixel_values=x)
        sync()
        done, t0 = 0, time.perf_counter()
        while done < n:
            model(pixel_values=x)
            done += batch
        sync()
        print(json.dumps({"images_per_s": done / (time.perf_counter() - t0)}))
    else:
        folder, out_path = sys.argv[5], sys.argv[6]
        proc = Processor.from_pretrained(ckpt)
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
        outs = []
        for i in range(0, len(files), batch):
            ims = [Image.open(f).convert("RGB") for f in files[i:i + batch]]
            px = proc(images=ims, return_tensors="pt")["pixel_values"]
            outs.append(embed(px))
        np.save(out_path, np.concatenate(outs))
"#;

pub fn bench_embed(args: &BenchEmbedArgs) -> anyhow::Result<()> {
    let (dir, threads) = crate::bench::scratch_and_threads(&args.dir, args.threads)?;
    eprintln!("writing a random ViT-B/32 checkpoint (HF format) ...");
    let ckpt = ensure_tiny_clip(
        &dir.join("vit-b32-random"),
        &TinyClipSpec::vit_base_patch32(0),
        &crate::synthetic::corpus(),
    )?;

    // Model only, in this process.
    let dtype = match args.dtype.as_str() {
        "f32" => ComputeDtype::F32,
        "f16" => ComputeDtype::F16,
        "bf16" => ComputeDtype::Bf16,
        other => bail!("--dtype {other}: expected f32, f16 or bf16"),
    };
    let device = device_for(args.gpu, false)?;
    let candle_dtype = match dtype {
        ComputeDtype::F32 => candle_core::DType::F32,
        ComputeDtype::F16 => candle_core::DType::F16,
        ComputeDtype::Bf16 => candle_core::DType::BF16,
    };
    let model = ClipEmbedder::load(&ClipModelFiles::from_dir(&ckpt)?, &device, candle_dtype)?;
    let mut rng = SplitMix64::new(7);
    let probe: Vec<f32> = (0..4 * 3 * 224 * 224)
        .map(|_| (rng.unit_f64() * 4.0 - 2.0) as f32)
        .collect();
    let ours_probe: Vec<f32> = model.embed_pixels(&probe, 4)?.flatten_all()?.to_vec1()?;
    // The same network on the CPU in f32: how far the GPU path (and its precision) moves
    // the numbers.
    let cpu_diff = if device.is_cpu() {
        None
    } else {
        let cpu = ClipEmbedder::load(
            &ClipModelFiles::from_dir(&ckpt)?,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )?;
        let on_cpu: Vec<f32> = cpu.embed_pixels(&probe, 4)?.flatten_all()?.to_vec1()?;
        Some(max_abs_diff(&ours_probe, &on_cpu))
    };
    // The embed stage's input path (byte pixels, normalised where the model runs) against
    // f32 pixels normalised on the host, on the same device: they must agree to the bit.
    let byte_path_diff = {
        let mut bytes = vec![0u8; 4 * 3 * 224 * 224];
        bytes
            .iter_mut()
            .for_each(|b| *b = (rng.next_u64() >> 56) as u8);
        let table = PixelTable::new(&model.preprocess);
        let host: Vec<f32> = bytes
            .chunks(3 * 224 * 224)
            .flat_map(|im| table.normalise(im))
            .collect();
        let want = candle_core::Tensor::from_vec(host, (4, 3, 224, 224), &device)?
            .to_dtype(candle_dtype)?
            .to_dtype(candle_core::DType::F32)?;
        let got = model
            .pixel_input(bytes, 4)?
            .to_dtype(candle_core::DType::F32)?;
        (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?
    };
    // Model only: the pixels are already on the device, in the compute dtype, as for the peer.
    let pixels: Vec<f32> = probe
        .iter()
        .cycle()
        .take(args.batch * 3 * 224 * 224)
        .copied()
        .collect();
    let x = candle_core::Tensor::from_vec(pixels, (args.batch, 3, 224, 224), &device)?
        .to_dtype(candle_dtype)?;
    for _ in 0..3 {
        model.embed_pixel_tensor(&x)?.to_vec2::<f32>()?;
    }
    // At least eight batches, so short end-to-end runs still time the model steadily.
    let model_images = args.images.max(8 * args.batch);
    let time_ours = || -> anyhow::Result<f64> {
        let (mut done, start) = (0, Instant::now());
        while done < model_images {
            let out = model.embed_pixel_tensor(&x)?;
            done += args.batch;
            if done >= model_images {
                out.to_vec2::<f32>()?;
            }
        }
        Ok(done as f64 / start.elapsed().as_secs_f64())
    };
    let peer = if args.no_peer {
        None
    } else {
        Some(Peer::prepare(args, &dir, &ckpt, threads, &probe)?)
    };
    let (mut ours_rounds, mut peer_rounds) = (Vec::new(), Vec::new());
    let mut peer_probe = None;
    for round in 1..=args.rounds.max(1) {
        eprintln!("model only, round {round} of {} ...", args.rounds.max(1));
        ours_rounds.push(time_ours()?);
        if let Some(peer) = &peer {
            let (rate, probe_out) = peer.model_only(args, model_images)?;
            peer_rounds.push(rate);
            peer_probe.get_or_insert(probe_out);
        }
    }
    let ours_model = median(&ours_rounds);
    let flops = model.image_flops();
    let profile = if args.profile {
        Some(model.profile_pixel_tensor(&x, 4)?)
    } else {
        None
    };
    let preprocess = model.preprocess.clone();
    drop((model, x));

    // End to end from JPEG files.
    let size = parse_size(&args.source_size)?;
    let folder = write_jpegs(&dir, args.images, size)?;
    let worker = worker_times(&folder, &preprocess)?;
    let e2e = |n: usize, tag: &str| -> anyhow::Result<Measured> {
        let images = if n == args.images {
            folder.clone()
        } else {
            write_jpegs(&dir, n, size)?
        };
        let work = dir.join(format!("work-{tag}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("embed")
            .arg("--images")
            .arg(&images)
            .arg("--model")
            .arg(&ckpt)
            .arg("--workdir")
            .arg(&work)
            .args(["--set", &format!("run.workers={threads}")])
            .args(["--set", &format!("embed.batch_size={}", args.batch)])
            .args(["--set", &format!("clip.dtype=\"{}\"", args.dtype)])
            .env("PREFCAP_QUIET", "1")
            .env("RAYON_NUM_THREADS", threads.to_string());
        if let Some(g) = args.gpu {
            cmd.args(["--gpu", &g.to_string()]);
        }
        eprintln!("prefcap end to end on {n} JPEGs ({tag}) ...");
        measure(cmd, "pipeline embed", args.gpu)
    };
    let ours_e2e = e2e(args.images, "x1")?;
    let ours_big = if args.scale > 1 {
        Some(e2e(args.images * args.scale, &format!("x{}", args.scale))?)
    } else {
        None
    };

    let peer = match (&peer, peer_probe) {
        (Some(p), Some(theirs)) => {
            let diff = max_abs_diff(&ours_probe, &theirs);
            let scale = theirs.iter().map(|x| x.abs()).fold(0f32, f32::max);
            eprintln!("transformers end to end on {} JPEGs ...", args.images);
            let peer_e2e = measure(
                p.command(
                    args,
                    "e2e",
                    &[folder.as_os_str(), dir.join("peer_e2e.npy").as_os_str()],
                ),
                "transformers",
                args.gpu,
            )?;
            Some((median(&peer_rounds), peer_e2e, diff, scale))
        }
        _ => None,
    };

    let on = match args.gpu {
        Some(g) => format!("CUDA device {g}, {}", args.dtype),
        None => format!("CPU, {threads} thread(s), f32"),
    };
    println!(
        "\nCLIP ViT-B/32 image embeddings, {on}, batch {}",
        args.batch
    );
    println!(
        "{:<26} {:>12} {:>16} {:>14}",
        "measurement", "images/s", "img/s per core", "peak RSS MiB"
    );
    println!(
        "{:<26} {:>12.1} {:>16} {:>14}   rounds: {}",
        "prefcap model only",
        ours_model,
        "",
        "",
        rates(&ours_rounds)
    );
    let tflops = ours_model * flops / 1e12;
    print!(
        "prefcap model forward: {:.2} GFLOP per image, {tflops:.1} TFLOP/s",
        flops / 1e9
    );
    if args.gpu.is_some() {
        print!(
            " = {:.1}% of the {:.0} TFLOP/s peak",
            100.0 * tflops / args.peak_tflops,
            args.peak_tflops
        );
    }
    println!();
    if let Some(stages) = &profile {
        let total: f64 = stages.iter().map(|(_, t)| t).sum();
        println!("\nwhere the model's time goes (synchronised per stage, summed over layers):");
        for (stage, t) in stages {
            println!(
                "  {stage:<22} {:>9.2} ms per batch {:>6.1}%",
                1e3 * t / 4.0,
                100.0 * t / total
            );
        }
    }
    println!(
        "byte pixels normalised on the {} vs f32 pixels from the host: max abs diff {byte_path_diff:.1e}",
        if device.is_cpu() { "CPU" } else { "GPU" }
    );
    println!(
        "one embed worker on the {}x{} JPEGs: {:.0} images/s (decode {:.2} ms + resize and crop {:.2} ms per image; \
         the image crate's JPEG decoder, not Pillow's, would take {:.2} ms)",
        size.0,
        size.1,
        1.0 / (worker.decode + worker.crop),
        1e3 * worker.decode,
        1e3 * worker.crop,
        1e3 * worker.image_crate_decode
    );
    if let Some(d) = cpu_diff {
        println!(
            "prefcap GPU ({}) vs prefcap CPU (f32), same pixels: max abs diff {d:.2e}",
            args.dtype
        );
    }
    let row = |name: &str, n: usize, m: &Measured| {
        println!(
            "{name:<26} {:>12.1} {:>16.1} {:>14.1}",
            n as f64 / m.wall,
            n as f64 / m.cpu.max(1e-9),
            m.peak_rss_mib
        )
    };
    row("prefcap end to end", args.images, &ours_e2e);
    if let Some(big) = &ours_big {
        row(
            &format!("prefcap end to end x{}", args.scale),
            args.images * args.scale,
            big,
        );
    }
    if let Some((peer_model, peer_e2e, diff, scale)) = &peer {
        println!(
            "{:<26} {:>12.1} {:>16} {:>14}   rounds: {}",
            "transformers model only",
            peer_model,
            "",
            "",
            rates(&peer_rounds)
        );
        row("transformers end to end", args.images, peer_e2e);
        let per_round: Vec<String> = ours_rounds
            .iter()
            .zip(&peer_rounds)
            .map(|(o, p)| format!("{:.2}", o / p))
            .collect();
        println!(
            "\nratio prefcap / transformers: model only {:.2}x (medians; round by round {}), end to end {:.2}x",
            ours_model / peer_model,
            per_round.join(", "),
            (args.images as f64 / ours_e2e.wall) / (args.images as f64 / peer_e2e.wall)
        );
        println!("same checkpoint, same pixels: max abs diff of image embeddings {diff:.2e} (max |value| {scale:.2})");
    }
    if let Some(big) = &ours_big {
        println!(
            "peak RSS x1 -> x{}: {:.1} -> {:.1} MiB",
            args.scale, ours_e2e.peak_rss_mib, big.peak_rss_mib
        );
        if args.gpu.is_some() {
            println!(
                "peak GPU memory above idle x1 -> x{}: {} -> {} MiB",
                args.scale,
                crate::bench::gpu_mib(ours_e2e.peak_gpu_mib),
                crate::bench::gpu_mib(big.peak_gpu_mib)
            );
        }
    }
    Ok(())
}

/// The Python peer: its interpreter (in the benchmark's virtual environment), the script,
/// the checkpoint and the probe pixels both tools embed.
struct Peer {
    python: PathBuf,
    script: PathBuf,
    ckpt: PathBuf,
    threads: usize,
    probe: PathBuf,
    probe_out: PathBuf,
}

impl Peer {
    fn prepare(
        args: &BenchEmbedArgs,
        dir: &Path,
        ckpt: &Path,
        threads: usize,
        probe: &[f32],
    ) -> anyhow::Result<Self> {
        let python = crate::bench::ensure_venv(
            &args.venv,
            &["torch", "transformers", "pillow", "numpy", "safetensors"],
            "import torch, transformers, PIL, numpy",
        )?;
        let script = dir.join("peer_clip.py");
        std::fs::write(&script, PEER_SCRIPT)?;
        let probe_path = dir.join("probe.f32");
        let bytes: Vec<u8> = probe.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(&probe_path, bytes)?;
        Ok(Self {
            python,
            script,
            ckpt: ckpt.to_path_buf(),
            threads,
            probe: probe_path,
            probe_out: dir.join("peer_probe.f32"),
        })
    }

    /// The script in `mode` with the common arguments, then `rest`.
    fn command(&self, args: &BenchEmbedArgs, mode: &str, rest: &[&OsStr]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script)
            .arg(mode)
            .arg(&self.ckpt)
            .arg(self.threads.to_string())
            .arg(args.batch.to_string())
            .args(rest)
            .env("OMP_NUM_THREADS", self.threads.to_string())
            .envs(peer_env(args));
        cmd
    }

    /// One model-only measurement (images/s) and the peer's embeddings of the probe.
    fn model_only(&self, args: &BenchEmbedArgs, images: usize) -> anyhow::Result<(f64, Vec<f32>)> {
        let n = images.to_string();
        let rest = [
            n.as_ref(),
            self.probe.as_os_str(),
            self.probe_out.as_os_str(),
        ];
        let out = self.command(args, "model", &rest).output()?;
        if !out.status.success() {
            bail!(
                "transformers failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let rate: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let theirs = std::fs::read(&self.probe_out)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((
            rate["images_per_s"].as_f64().context("peer output")?,
            theirs,
        ))
    }
}

/// The median of a non-empty sample.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// `a, b, c` with one decimal.
fn rates(v: &[f64]) -> String {
    v.iter()
        .map(|r| format!("{r:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where and in which precision the peer runs: the same as prefcap.
fn peer_env(args: &BenchEmbedArgs) -> Vec<(&'static str, String)> {
    match args.gpu {
        Some(g) => vec![
            ("PEER_DEVICE", format!("cuda:{g}")),
            ("PEER_DTYPE", args.dtype.clone()),
        ],
        None => vec![("PEER_DEVICE", "cpu".into()), ("PEER_DTYPE", "f32".into())],
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Seconds per image one embed worker spends, each the fastest of three passes.
struct WorkerTimes {
    /// Decoding a JPEG (libjpeg, Pillow's decoder).
    decode: f64,
    /// Resizing and cropping it.
    crop: f64,
    /// Decoding it with the image crate instead, for comparison.
    image_crate_decode: f64,
}

/// [`WorkerTimes`] over up to 256 of the folder's files, read into memory first.
fn worker_times(folder: &Path, cfg: &ClipPreprocessConfig) -> anyhow::Result<WorkerTimes> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    files.truncate(256);
    let encoded = files
        .iter()
        .map(std::fs::read)
        .collect::<Result<Vec<_>, _>>()?;
    let n = encoded.len().max(1) as f64;
    let (mut decode, mut crop, mut image_crate) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        let start = Instant::now();
        let decoded = encoded
            .iter()
            .map(|jpeg| Ok(crate::imaging::preprocess::decode_rgb(jpeg)?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        decode = decode.min(start.elapsed().as_secs_f64() / n);
        let start = Instant::now();
        for rgb in &decoded {
            let (w, h) = rgb.dimensions();
            let pixels = crop_rgb8(rgb.as_raw(), w as usize, h as usize, cfg)?;
            anyhow::ensure!(pixels.len() == 3 * 224 * 224);
        }
        crop = crop.min(start.elapsed().as_secs_f64() / n);
        let start = Instant::now();
        for jpeg in &encoded {
            std::hint::black_box(image::load_from_memory(jpeg)?.into_rgb8());
        }
        image_crate = image_crate.min(start.elapsed().as_secs_f64() / n);
    }
    Ok(WorkerTimes {
        decode,
        crop,
        image_crate_decode: image_crate,
    })
}

/// `n` photo-like JPEGs of `w`×`h` in their own folder (32 distinct images, hard-linked).
fn write_jpegs(dir: &Path, n: usize, (w, h): (u32, u32)) -> anyhow::Result<PathBuf> {
    let folder = dir.join(format!("jpegs-{w}x{h}-{n}"));
    if folder.is_dir() && std::fs::read_dir(&folder)?.count() == n {
        return Ok(folder);
    }
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder)?;
    let sources = dir.join(format!("sources-{w}x{h}"));
    std::fs::create_dir_all(&sources)?;
    for i in 0..32 {
        let p = sources.join(format!("{i}.jpg"));
        if !p.is_file() {
            std::fs::write(&p, source_jpeg(i, w, h).map_err(anyhow::Error::msg)?)?;
        }
    }
    for i in 0..n {
        let src = sources.join(format!("{}.jpg", i % 32));
        let dst = folder.join(format!("{i:07}.jpg"));
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(folder)
}
