//! The one training engine every training stage (and every benchmark's training step) uses.
//!
//! An [`Objective`] turns a batch into a loss and named scalars for each of its parameter
//! groups ([`ParamGroup`]: variables with their own optimiser settings and schedule), and may
//! generate samples inside its step (beam candidates, rollouts) with the current parameters;
//! [`Batches`] supplies the batches over bounded channels from loader threads. [`fit`] does the
//! rest: AdamW per group (decoupled weight decay, as PyTorch), linear warmup then cosine
//! decay, gradient accumulation, global gradient-norm clipping, a NaN/Inf guard (the batch is
//! skipped for that group and counted, no update is applied), periodic validation,
//! best-checkpoint keeping, early stopping with patience, and resume from the last checkpoint
//! with identical results. [`Trainer::step`] is one optimizer step of the same machinery, for
//! code that drives batches itself. The time the loop waits on the data channel is measured
//! and reported as `data_wait_fraction`.
//!
//! Groups are updated in order on every batch: group 0's loss, backward and update, then group
//! 1's loss (which sees group 0's new parameters), and so on: a GAN's discriminator then
//! generator, a policy then its value head. Each group's gradients are taken from its own
//! loss and applied to its own variables only.

pub mod adamw;
mod checkpoint;
pub mod tensorboard;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};

use crate::data::records::MetricRow;
use crate::data::shard::{read_parquet, write_parquet};
use crate::error::{CandleContext, Error, Result};
use crate::progress::Progress;

pub use adamw::{clip_and_step, grad_norm, gradients, AdamW};

/// What a training stage's run did: rows per epoch, the fit, where its checkpoints are.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingSummary {
    /// Rows trained on per epoch.
    pub rows: u64,
    pub fit: FitSummary,
    /// Where the checkpoints are (`best/`, `last/`, `captioner.json`).
    pub dir: String,
}

impl std::fmt::Display for TrainingSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.fit.state;
        write!(
            f,
            "{} optimizer steps over {} rows; best val loss {:.4} at step {}; {} non-finite batches skipped; trainer waited on data {:.1}% of the time; checkpoints in {}",
            s.step,
            self.rows,
            s.best_value.unwrap_or(f64::NAN),
            s.best_step.unwrap_or(0),
            s.skipped_nonfinite,
            100.0 * self.fit.data_wait_fraction,
            self.dir
        )
    }
}

/// A training stage's loop and optimiser settings (each stage has its own section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Linear warmup steps (optimizer steps), then cosine decay to 0 at the last step.
    pub warmup_steps: usize,
    /// Batches whose gradients are summed (and averaged) per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this; 0 = no clipping.
    pub max_grad_norm: f64,
    /// Validate every this many optimizer steps; 0 = at the end of each epoch.
    pub eval_every: usize,
    /// Stop after this many validations without improvement; 0 = never.
    pub patience: usize,
    /// Seed of the data order (and of any sampling an objective does).
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 20,
            grad_accum: 1,
            max_grad_norm: 1.0,
            eval_every: 0,
            patience: 0,
            seed: 42,
        }
    }
}

impl TrainConfig {
    /// The optimiser settings of a group trained under this section.
    pub fn optimizer(&self) -> OptimizerConfig {
        OptimizerConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            warmup_steps: self.warmup_steps,
            max_grad_norm: self.max_grad_norm,
            schedule: Schedule::WarmupCosine,
        }
    }
}

/// A stage section that holds the loop and optimiser keys of [`TrainConfig`] beside the
/// method's own (`[train_contrastive]`: `epochs`, `lr`, ... and `temperature`, ...), both
/// parsed strictly: a key neither knows is an error naming it. A loop key the section leaves
/// out takes the method's default ([`MethodDefaults::training`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WithTraining<T> {
    pub train: TrainConfig,
    pub method: T,
}

/// A method's own defaults for the loop and optimiser keys of its section (an online RL
/// stage fine-tunes at a far lower rate than a captioner trained from scratch).
pub trait MethodDefaults {
    fn training() -> TrainConfig {
        TrainConfig::default()
    }
}

impl<T: Default + MethodDefaults> Default for WithTraining<T> {
    fn default() -> Self {
        Self {
            train: T::training(),
            method: T::default(),
        }
    }
}

impl<T: Serialize> Serialize for WithTraining<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let table = |v: toml::Value| match v {
            toml::Value::Table(t) => Ok(t),
            _ => Err(S::Error::custom("a training section is a table")),
        };
        let mut all = table(toml::Value::try_from(&self.train).map_err(S::Error::custom)?)?;
        all.extend(table(
            toml::Value::try_from(&self.method).map_err(S::Error::custom)?,
        )?);
        all.serialize(s)
    }
}

impl<'de, T: serde::de::DeserializeOwned + MethodDefaults> Deserialize<'de> for WithTraining<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let all = toml::Table::deserialize(d)?;
        let train_keys = match toml::Value::try_from(TrainConfig::default()) {
            Ok(toml::Value::Table(t)) => t,
            _ => return Err(D::Error::custom("cannot list the training keys")),
        };
        let (given, method): (toml::Table, toml::Table) = all
            .into_iter()
            .partition(|(k, _)| train_keys.contains_key(k));
        // The method's defaults under the keys given.
        let mut train = match toml::Value::try_from(T::training()) {
            Ok(toml::Value::Table(t)) => t,
            _ => return Err(D::Error::custom("cannot list the training defaults")),
        };
        train.extend(given);
        // Each part strictly, its errors naming the key.
        fn part<T: serde::de::DeserializeOwned, E: serde::de::Error>(
            t: toml::Table,
        ) -> std::result::Result<T, E> {
            serde_path_to_error::deserialize(toml::Value::Table(t)).map_err(|e| {
                let path = e.path().to_string();
                if path == "." {
                    E::custom(e.into_inner())
                } else {
                    E::custom(format!("`{path}`: {}", e.into_inner()))
                }
            })
        }
        Ok(Self {
            train: part(train)?,
            method: part(method)?,
        })
    }
}

/// How a group's learning rate moves over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup from 0 over `warmup_steps`, then cosine decay to 0 at the last step
    /// (transformers' `get_cosine_schedule_with_warmup`).
    WarmupCosine,
    /// The peak rate throughout.
    Constant,
}

/// One group's AdamW settings and schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub warmup_steps: usize,
    /// Clip the group's global gradient norm to this; 0 = no clipping.
    pub max_grad_norm: f64,
    pub schedule: Schedule,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        TrainConfig::default().optimizer()
    }
}

impl OptimizerConfig {
    /// The learning rate at optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        match self.schedule {
            Schedule::WarmupCosine => lr_at(step, total, self.warmup_steps, self.lr),
            Schedule::Constant => self.lr,
        }
    }
}

/// Variables trained together by one optimiser.
#[derive(Clone)]
pub struct ParamGroup {
    /// Names the group in metrics (`<name>/loss` when there are several groups) and in
    /// checkpoints (`<name>.safetensors`; the first group's files are `model.safetensors`
    /// and `optimizer.safetensors`).
    pub name: String,
    /// The group's variables (a clone of a `VarMap` shares its variables).
    pub vars: VarMap,
    pub optimizer: OptimizerConfig,
}

impl ParamGroup {
    pub fn new(name: &str, vars: &VarMap, optimizer: OptimizerConfig) -> Self {
        Self {
            name: name.to_string(),
            vars: vars.clone(),
            optimizer,
        }
    }
}

/// Where a call of [`Objective::step`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepContext {
    /// The parameter group whose loss is asked for (index into [`Objective::groups`]).
    pub group: usize,
    /// False during validation (no gradients are taken).
    pub train: bool,
    /// Optimizer steps done so far, and the epoch in progress.
    pub step: usize,
    pub epoch: usize,
}

/// What one batch gave for one group: the loss to minimise and scalars to log.
pub struct StepOutput {
    /// Scalar loss tensor.
    pub loss: Tensor,
    /// Named scalars (`nll_loss`, `rewards/accuracies`, ...), already means over the batch.
    pub scalars: Vec<(String, f64)>,
    /// Rows that counted (rows with no supervised token are dropped by the objective); the
    /// weight of this batch's loss and scalars in the logged means. 0 = nothing to learn.
    pub rows: usize,
}

impl StepOutput {
    /// A batch with nothing to learn (no row counts): a zero loss on `device` and `scalars`.
    pub fn nothing(
        device: &candle_core::Device,
        scalars: Vec<(String, f64)>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            loss: Tensor::new(0f32, device)?,
            scalars,
            rows: 0,
        })
    }
}

/// A training objective: its parameter groups and what one batch costs each of them.
pub trait Objective {
    type Batch: Send + 'static;
    /// The parameter groups, updated in this order on every batch (most objectives have one).
    fn groups(&self) -> Vec<ParamGroup>;
    /// Loss and scalars of `batch` for group `ctx.group`: called once per group and batch,
    /// in group order, each after the previous group's update. An objective that samples
    /// inside the step (beam candidates, rollouts) does so here, with the current
    /// parameters, and may keep the samples for the later groups of the same batch.
    fn step(&mut self, batch: &Self::Batch, ctx: &StepContext) -> candle_core::Result<StepOutput>;
    /// Called after group `group`'s variables were updated (constraints such as a clamped
    /// logit scale).
    fn after_update(&mut self, _group: usize) -> candle_core::Result<()> {
        Ok(())
    }
    /// Scalars over the whole validation pass (retrieval recall over every held-out pair),
    /// called after its last batch: the objective gathers what it needs in its validation
    /// steps (`ctx.train` false) and starts afresh here.
    fn validation_end(&mut self) -> candle_core::Result<Vec<(String, f64)>> {
        Ok(Vec::new())
    }
    /// Whether the engine validates the starting parameters (step 0) before the first
    /// update, so a run's metrics set the selected checkpoint against its start (the online
    /// stages, which fine-tune a trained model).
    fn validate_at_start(&self) -> bool {
        false
    }
    /// Which validation scalar decides the best checkpoint, and whether higher is better;
    /// `None`: the first group's loss, lower is better.
    fn selection(&self) -> Option<(&str, bool)> {
        None
    }
}

/// Where an objective's batches come from.
pub trait Batches<B> {
    /// The batches of `epoch` of the training split, in a deterministic order.
    fn train(&self, epoch: usize) -> Result<Receiver<Result<B>>>;
    /// The validation batches.
    fn val(&self) -> Result<Receiver<Result<B>>>;
    /// Batches in one training epoch (for the schedule).
    fn per_epoch(&self) -> usize;
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup from 0 over
/// `warmup` steps, then cosine decay to 0 (transformers' `get_cosine_schedule_with_warmup`).
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// The state saved beside a checkpoint's weights.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch in progress and how many of its batches were consumed.
    pub epoch: usize,
    pub batches_done_in_epoch: usize,
    pub best_value: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_without_improvement: usize,
    pub skipped_nonfinite: u64,
    pub stopped_early: bool,
    pub finished: bool,
}

/// What `fit` leaves behind.
#[derive(Debug, Clone, Serialize)]
pub struct FitSummary {
    pub state: TrainState,
    /// Directory of the best checkpoint (`best/`), or of the last when nothing was validated.
    pub best_dir: PathBuf,
    /// Fraction of training wall time spent waiting for the next batch.
    pub data_wait_fraction: f64,
    pub resumed_from_step: Option<usize>,
}

/// Where `fit` writes: `<dir>/last/`, `<dir>/best/` and the metrics table.
pub struct FitOutput<'a> {
    pub checkpoint_dir: &'a Path,
    pub metrics_path: &'a Path,
    pub run_id: &'a str,
    pub stage: &'a str,
}

/// One group under training: its optimiser and the gradients accumulated since its last
/// update.
struct GroupState {
    group: ParamGroup,
    opt: AdamW,
    /// The variables in the order `opt` expects their gradients.
    vars: Vec<Var>,
    pending: Vec<Option<Tensor>>,
    pending_batches: usize,
    /// The gradient norm of the last batch added (the update's norm when it was the only one).
    last_norm: f64,
}

/// Seconds spent per phase of the optimizer steps of a [`Trainer`] (summed over groups).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimings {
    /// The objective's step (forward pass, sampling) and reading the loss.
    pub forward: f64,
    /// Backward pass and taking the gradients.
    pub backward: f64,
    pub grad_norm: f64,
    /// Clipping and the AdamW update.
    pub update: f64,
}

/// What one [`Trainer::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Each group's loss (NaN when the objective had no rows for it).
    pub losses: Vec<f64>,
    /// Whether each group was updated (not when its loss or gradient was non-finite).
    pub updated: Vec<bool>,
    pub timings: StepTimings,
}

/// The optimisers of an objective's groups: what [`fit`] drives, and what code that feeds
/// batches itself (benchmarks) calls through [`Trainer::step`].
pub struct Trainer {
    groups: Vec<GroupState>,
    /// With a device: wait for it at each phase boundary, so [`StepTimings`] are true on a GPU.
    timing_device: Option<Device>,
    timings: StepTimings,
}

/// How one group's share of a batch went.
enum Added {
    /// The loss (and its rows) joined the pending gradients.
    Loss(f64, usize),
    /// No supervised rows: nothing to learn from.
    Empty,
    /// A non-finite loss or gradient: skipped.
    NonFinite,
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    Ok(f64::from(t.to_dtype(DType::F32)?.to_scalar::<f32>()?))
}

impl Trainer {
    /// AdamW for each group, its moments at zero.
    pub fn new(groups: Vec<ParamGroup>) -> Result<Self> {
        if groups.is_empty() {
            return Err(Error::Invalid(
                "an objective without parameter groups".into(),
            ));
        }
        let groups = groups
            .into_iter()
            .map(|group| {
                let opt = AdamW::new(&group.vars).during("creating the optimizer")?;
                Ok(GroupState {
                    vars: opt.var_list(),
                    opt,
                    group,
                    pending: Vec::new(),
                    pending_batches: 0,
                    last_norm: 0.0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            groups,
            timing_device: None,
            timings: StepTimings::default(),
        })
    }

    /// Waits for `device` at every phase boundary, so the phase timings are true on a GPU
    /// (costs the overlap of host and device work).
    pub fn time_phases_on(&mut self, device: &Device) {
        self.timing_device = Some(device.clone());
    }

    /// The phase timings summed since the trainer was made.
    pub fn timings(&self) -> StepTimings {
        self.timings
    }

    fn sync(&self) -> Result<()> {
        match &self.timing_device {
            Some(d) => d.synchronize().during("waiting for the device"),
            None => Ok(()),
        }
    }

    /// The metric name of group `g`'s `what` (`loss`, `lr`, `grad_norm`): plain for a single
    /// group, `<group>/<what>` for several.
    fn metric(&self, g: usize, what: &str) -> String {
        if self.groups.len() == 1 {
            what.to_string()
        } else {
            format!("{}/{what}", self.groups[g].group.name)
        }
    }

    /// Group `g`'s loss on `batch`, its backward pass, and its gradients added to those
    /// pending.
    fn add_batch<O: Objective>(
        &mut self,
        obj: &mut O,
        batch: &O::Batch,
        ctx: &StepContext,
    ) -> Result<(Added, Vec<(String, f64)>)> {
        let g = ctx.group;
        let t = Instant::now();
        let out = obj.step(batch, ctx).during("the objective's step")?;
        if out.rows == 0 {
            self.timings.forward += t.elapsed().as_secs_f64();
            return Ok((Added::Empty, Vec::new()));
        }
        let value = scalar(&out.loss).during("reading the loss")?;
        self.timings.forward += t.elapsed().as_secs_f64();
        if !value.is_finite() {
            return Ok((Added::NonFinite, Vec::new()));
        }
        let t = Instant::now();
        let store = out.loss.backward().during("the backward pass")?;
        let grads = gradients(&store, &self.groups[g].vars);
        drop(store);
        self.sync()?;
        self.timings.backward += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let norm = grad_norm(&grads).during("the gradient norm")?;
        self.timings.grad_norm += t.elapsed().as_secs_f64();
        if !norm.is_finite() {
            return Ok((Added::NonFinite, Vec::new()));
        }
        let state = &mut self.groups[g];
        state.last_norm = norm;
        if state.pending.is_empty() {
            state.pending = grads;
        } else {
            for (p, g) in state.pending.iter_mut().zip(grads) {
                *p = match (p.take(), g) {
                    (Some(a), Some(b)) => Some((a + b).during("accumulating gradients")?),
                    (a, b) => a.or(b),
                };
            }
        }
        state.pending_batches += 1;
        Ok((Added::Loss(value, out.rows), out.scalars))
    }

    /// Whether group `g` has gradients waiting for an update.
    fn has_pending(&self, g: usize) -> bool {
        self.groups[g].pending_batches > 0
    }

    /// Applies group `g`'s pending gradients (their mean) at optimizer step `step` of `total`;
    /// returns the learning rate and the gradient norm.
    fn apply<O: Objective>(
        &mut self,
        obj: &mut O,
        g: usize,
        step: usize,
        total: usize,
    ) -> Result<(f64, f64)> {
        let t = Instant::now();
        let state = &mut self.groups[g];
        let n = state.pending_batches;
        let mut grads = std::mem::take(&mut state.pending);
        state.pending_batches = 0;
        if n > 1 {
            for gr in grads.iter_mut().flatten() {
                *gr = (&*gr / n as f64).during("averaging gradients")?;
            }
        }
        // One batch: its gradient norm was taken when it was added.
        let norm = match n {
            1 => state.last_norm,
            _ => grad_norm(&grads).during("the gradient norm")?,
        };
        let lr = state.group.optimizer.lr_at(step, total);
        clip_and_step(&mut state.opt, &grads, norm, lr, &state.group.optimizer)
            .during("the optimizer step")?;
        obj.after_update(g).during("after the update")?;
        self.sync()?;
        self.timings.update += t.elapsed().as_secs_f64();
        Ok((lr, norm))
    }

    /// One optimizer step from one batch, without accumulation: for every group in order,
    /// the objective's step, backward, clipping and AdamW at the rate of step `step` of
    /// `total` (a constant schedule ignores both). What [`fit`] does per batch.
    pub fn step<O: Objective>(
        &mut self,
        obj: &mut O,
        batch: &O::Batch,
        step: usize,
        total: usize,
    ) -> Result<StepReport> {
        let timings_before = self.timings;
        let mut report = StepReport {
            losses: Vec::new(),
            updated: Vec::new(),
            timings: StepTimings::default(),
        };
        for g in 0..self.groups.len() {
            let ctx = StepContext {
                group: g,
                train: true,
                step,
                epoch: 0,
            };
            let (added, _) = self.add_batch(obj, batch, &ctx)?;
            report.losses.push(match added {
                Added::Loss(v, _) => v,
                _ => f64::NAN,
            });
            let update = self.has_pending(g);
            if update {
                self.apply(obj, g, step, total)?;
            }
            report.updated.push(update);
        }
        let t = self.timings;
        report.timings = StepTimings {
            forward: t.forward - timings_before.forward,
            backward: t.backward - timings_before.backward,
            grad_norm: t.grad_norm - timings_before.grad_norm,
            update: t.update - timings_before.update,
        };
        Ok(report)
    }
}

/// Accumulates scalars of several batches into means.
#[derive(Default)]
struct Means {
    sums: Vec<(String, f64, f64)>,
}

impl Means {
    fn add(&mut self, name: &str, value: f64, weight: f64) {
        match self.sums.iter_mut().find(|(n, _, _)| n == name) {
            Some(e) => {
                e.1 += value * weight;
                e.2 += weight;
            }
            None => self.sums.push((name.to_string(), value * weight, weight)),
        }
    }
    fn means(&self) -> Vec<(String, f64)> {
        self.sums
            .iter()
            .map(|(n, s, w)| (n.clone(), if *w > 0.0 { s / w } else { f64::NAN }))
            .collect()
    }
}

/// Runs the validation batches through every group; returns mean losses and scalars, and
/// how many (batch, group) losses were non-finite and left out of them
/// (`skipped_nonfinite_batches`), as in training: one would make every mean NaN, and no later
/// validation could then count as an improvement.
fn validate<O: Objective, D: Batches<O::Batch>>(
    obj: &mut O,
    data: &D,
    trainer: &Trainer,
    state: &TrainState,
) -> Result<Vec<(String, f64)>> {
    let mut means = Means::default();
    let mut skipped = 0u64;
    for batch in data.val()? {
        let batch = batch?;
        for g in 0..trainer.groups.len() {
            let ctx = StepContext {
                group: g,
                train: false,
                step: state.step,
                epoch: state.epoch,
            };
            let out = obj.step(&batch, &ctx).during("validation")?;
            let w = out.rows as f64;
            if w == 0.0 {
                continue;
            }
            let loss = scalar(&out.loss).during("validation")?;
            if !loss.is_finite() {
                skipped += 1;
                continue;
            }
            means.add(&trainer.metric(g, "loss"), loss, w);
            for (n, v) in &out.scalars {
                means.add(n, *v, w);
            }
        }
    }
    let mut out = means.means();
    out.extend(obj.validation_end().during("validation")?);
    out.push(("skipped_nonfinite_batches".into(), skipped as f64));
    Ok(out)
}

/// The metrics table being written (earlier rows, a resumed run's, and this run's) and the
/// TensorBoard events of this run's rows.
struct MetricLog<'a> {
    rows: Vec<MetricRow>,
    out: &'a FitOutput<'a>,
    events: Option<tensorboard::EventWriter>,
}

impl MetricLog<'_> {
    fn push(&mut self, state: &TrainState, split: &str, name: &str, value: f64) {
        if let Some(events) = &mut self.events {
            events.scalar(&tensorboard::tag(split, name), state.step as i64, value);
        }
        self.rows.push(MetricRow {
            run_id: self.out.run_id.to_string(),
            stage: self.out.stage.to_string(),
            step: state.step as i64,
            epoch: state.epoch as i64,
            split: split.to_string(),
            name: name.to_string(),
            value,
        });
    }

    fn write(&mut self) -> Result<()> {
        if let Some(events) = &mut self.events {
            events.flush()?;
        }
        write_parquet(self.out.metrics_path, &self.rows)
    }
}

/// Trains `obj` on `data` under `cfg` (its loop settings: epochs, accumulation, validation,
/// patience; each group brings its own optimiser settings), resuming from
/// `<checkpoint_dir>/last` when it exists. Metrics go to `out.metrics_path` in long format.
pub fn fit<O: Objective, D: Batches<O::Batch>>(
    obj: &mut O,
    data: &D,
    cfg: &TrainConfig,
    out: &FitOutput,
) -> Result<FitSummary> {
    let accum = cfg.grad_accum.max(1);
    let steps_per_epoch = data.per_epoch();
    if steps_per_epoch == 0 {
        return Err(Error::Invalid(format!(
            "{}: the training split has no batches",
            out.stage
        )));
    }
    // As transformers' Trainer, an epoch's last batches step even when fewer than `accum`:
    // accumulation never spans two epochs (so an epoch-end checkpoint holds all of it).
    let total_steps = (cfg.epochs * steps_per_epoch.div_ceil(accum)).max(1);
    let mut trainer = Trainer::new(obj.groups())?;
    let last_dir = out.checkpoint_dir.join("last");
    let best_dir = out.checkpoint_dir.join("best");
    let mut log = MetricLog {
        rows: if out.metrics_path.is_file() {
            read_parquet(out.metrics_path)?
        } else {
            Vec::new()
        },
        out,
        events: None,
    };
    let mut state = TrainState::default();
    let mut resumed_from_step = None;
    if checkpoint::exists(&last_dir) {
        state = checkpoint::load(&last_dir, &mut trainer)?;
        resumed_from_step = Some(state.step);
        // Metrics logged after the checkpoint belong to the lost part of the run.
        log.rows
            .retain(|m| m.stage != out.stage || m.step <= state.step as i64);
        eprintln!(
            "[{}] resuming from step {} (epoch {})",
            out.stage, state.step, state.epoch
        );
    }
    let runs = out.metrics_path.parent().unwrap_or(Path::new("."));
    log.events = Some(tensorboard::EventWriter::create(
        &runs.join("tensorboard").join(out.stage),
        resumed_from_step,
    )?);
    if resumed_from_step.is_none() && obj.validate_at_start() {
        for (n, v) in validate(obj, data, &trainer, &state)? {
            log.push(&state, "val", &n, v);
        }
        log.write()?;
    }
    let selection = match obj.selection() {
        Some((name, higher)) => (name.to_string(), higher),
        None => (trainer.metric(0, "loss"), false),
    };
    let progress = Progress::new(out.stage, "steps", Some(total_steps as u64));
    progress.inc(state.step as u64);
    let started = Instant::now();
    let mut waited = 0f64;
    let mut train_means = Means::default();
    let groups = trainer.groups.len();
    // The step last validated (a resumed run's checkpoint was written after a validation).
    let mut validated_at = resumed_from_step;
    'epochs: while state.epoch < cfg.epochs && !state.finished {
        let rx = data.train(state.epoch)?;
        let mut index = 0usize;
        loop {
            let t0 = Instant::now();
            let Ok(batch) = rx.recv() else { break };
            waited += t0.elapsed().as_secs_f64();
            let batch = batch?;
            index += 1;
            if index <= state.batches_done_in_epoch {
                continue; // consumed before the checkpoint we resumed from
            }
            state.batches_done_in_epoch = index;
            let end_of_epoch = index == steps_per_epoch;
            // Each group: its loss and gradients; at the end of an accumulation (or of the
            // epoch, with what there is) its update, before the next group's loss.
            let mut stepped = Vec::new();
            for g in 0..groups {
                let ctx = StepContext {
                    group: g,
                    train: true,
                    step: state.step,
                    epoch: state.epoch,
                };
                let (added, scalars) = trainer.add_batch(obj, &batch, &ctx)?;
                match added {
                    Added::Loss(value, rows) => {
                        train_means.add(&trainer.metric(g, "loss"), value, rows as f64);
                        for (n, v) in &scalars {
                            train_means.add(n, *v, rows as f64);
                        }
                    }
                    Added::Empty => {}
                    Added::NonFinite => {
                        state.skipped_nonfinite += 1;
                        eprintln!(
                            "[{}] non-finite loss or gradient at step {}{}: batch skipped",
                            out.stage,
                            state.step,
                            if groups > 1 {
                                format!(" (group {})", trainer.groups[g].group.name)
                            } else {
                                String::new()
                            }
                        );
                    }
                }
                let pending = trainer.groups[g].pending_batches;
                if pending > 0 && (pending >= accum || end_of_epoch) {
                    let (lr, norm) = trainer.apply(obj, g, state.step, total_steps)?;
                    stepped.push((g, lr, norm));
                }
            }
            // Whether this batch completed an optimizer step. A batch that does not (skipped,
            // empty, or still accumulating) still counts toward the end of the epoch.
            let stepped = !stepped.is_empty() && {
                state.step += 1;
                progress.inc(1);
                for (n, v) in train_means.means() {
                    log.push(&state, "train", &n, v);
                }
                for &(g, lr, norm) in &stepped {
                    log.push(&state, "train", &trainer.metric(g, "lr"), lr);
                    log.push(&state, "train", &trainer.metric(g, "grad_norm"), norm);
                }
                train_means = Means::default();
                true
            };
            let step = state.step;
            let eval_now = if cfg.eval_every > 0 {
                stepped && step.is_multiple_of(cfg.eval_every)
            } else {
                end_of_epoch
            };
            if eval_now || (stepped && step == total_steps) {
                if end_of_epoch {
                    state.epoch += 1;
                    state.batches_done_in_epoch = 0;
                }
                if evaluate(
                    obj, data, &trainer, &mut state, &mut log, &selection, cfg, &best_dir,
                )? {
                    state.stopped_early = true;
                }
                validated_at = Some(step);
                state.finished = state.stopped_early || step >= total_steps;
                checkpoint::save(&last_dir, &trainer, &state)?;
                log.write()?;
                if state.finished {
                    break 'epochs;
                }
                if end_of_epoch {
                    continue 'epochs;
                }
            }
        }
        if state.batches_done_in_epoch != 0 {
            state.epoch += 1;
            state.batches_done_in_epoch = 0;
        }
    }
    // Steps after the last validation (skipped batches left the run short of the step
    // count that would have validated, or eval_every does not divide it) are validated and
    // can become `best/` too.
    if state.step > 0 && validated_at != Some(state.step) {
        evaluate(
            obj, data, &trainer, &mut state, &mut log, &selection, cfg, &best_dir,
        )?;
    }
    state.finished = true;
    checkpoint::save(&last_dir, &trainer, &state)?;
    log.write()?;
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    progress.finish("");
    Ok(FitSummary {
        best_dir: if best_dir.is_dir() {
            best_dir
        } else {
            last_dir
        },
        state,
        data_wait_fraction: waited / wall,
        resumed_from_step,
    })
}

/// Validates, logs (with training's count of skipped batches so far), keeps the best
/// checkpoint; returns whether patience ran out.
#[allow(clippy::too_many_arguments)]
fn evaluate<O: Objective, D: Batches<O::Batch>>(
    obj: &mut O,
    data: &D,
    trainer: &Trainer,
    state: &mut TrainState,
    log: &mut MetricLog,
    (select_name, higher_better): &(String, bool),
    cfg: &TrainConfig,
    best_dir: &Path,
) -> Result<bool> {
    let val = validate(obj, data, trainer, state)?;
    for (n, v) in &val {
        log.push(state, "val", n, *v);
    }
    log.push(
        state,
        "train",
        "skipped_nonfinite_batches",
        state.skipped_nonfinite as f64,
    );
    let Some(value) = val.iter().find(|(n, _)| n == select_name).map(|(_, v)| *v) else {
        return Ok(false);
    };
    let better = match state.best_value {
        None => value.is_finite(),
        Some(b) => value.is_finite() && if *higher_better { value > b } else { value < b },
    };
    if better {
        state.best_value = Some(value);
        state.best_step = Some(state.step);
        state.evals_without_improvement = 0;
        checkpoint::save(best_dir, trainer, state)?;
    } else {
        state.evals_without_improvement += 1;
    }
    Ok(cfg.patience > 0 && state.evals_without_improvement >= cfg.patience)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Init, VarBuilder};

    /// Linear regression y = 3x - 1 on fixed data; one batch can carry a NaN.
    struct Regression {
        vars: VarMap,
        w: Tensor,
        b: Tensor,
        nan_batch: Option<usize>,
        optimizer: OptimizerConfig,
    }

    /// The regression's batches: `batches` per epoch; (epoch, batch) `fail_at` makes the
    /// loader fail, as if the process died.
    struct RegressionData {
        batches: usize,
        fail_at: Option<(usize, usize)>,
    }

    type Points = (usize, Vec<f32>, Vec<f32>);

    impl Regression {
        fn new(nan_batch: Option<usize>) -> Self {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
            let w = vb.get_with_hints(1, "w", Init::Const(0.0)).unwrap();
            let b = vb.get_with_hints(1, "b", Init::Const(0.0)).unwrap();
            Self {
                vars,
                w,
                b,
                nan_batch,
                optimizer: cfg().optimizer(),
            }
        }
    }

    impl Objective for Regression {
        type Batch = Points;
        fn groups(&self) -> Vec<ParamGroup> {
            vec![ParamGroup::new("model", &self.vars, self.optimizer.clone())]
        }
        fn step(&mut self, batch: &Points, _ctx: &StepContext) -> candle_core::Result<StepOutput> {
            let (i, xs, ys) = batch;
            let n = xs.len();
            let x = Tensor::from_slice(xs, n, &Device::Cpu)?;
            let mut y = Tensor::from_slice(ys, n, &Device::Cpu)?;
            if self.nan_batch == Some(*i) {
                y = (y * f64::NAN)?;
            }
            let pred = x.broadcast_mul(&self.w)?.broadcast_add(&self.b)?;
            let loss = (pred - y)?.sqr()?.mean_all()?;
            Ok(StepOutput {
                loss,
                scalars: vec![("w".into(), f64::from(self.w.to_vec1::<f32>()?[0]))],
                rows: n,
            })
        }
    }

    impl Batches<Points> for RegressionData {
        fn train(&self, epoch: usize) -> Result<Receiver<Result<Points>>> {
            let (tx, rx) = crossbeam_channel::bounded(2);
            let (n, fail_at) = (self.batches, self.fail_at);
            std::thread::spawn(move || {
                for i in 0..n {
                    if fail_at == Some((epoch, i)) {
                        let _ = tx.send(Err(Error::Config("loader died".into())));
                        return;
                    }
                    let xs: Vec<f32> = (0..4)
                        .map(|k| ((i * 4 + k + epoch) % 9) as f32 / 4.0 - 1.0)
                        .collect();
                    let ys = xs.iter().map(|x| 3.0 * x - 1.0).collect();
                    if tx.send(Ok((i, xs, ys))).is_err() {
                        return;
                    }
                }
            });
            Ok(rx)
        }
        fn val(&self) -> Result<Receiver<Result<Points>>> {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let xs = vec![-1.0, 0.0, 0.5, 1.0];
            let ys = xs.iter().map(|x| 3.0 * x - 1.0).collect();
            tx.send(Ok((usize::MAX, xs, ys))).ok();
            Ok(rx)
        }
        fn per_epoch(&self) -> usize {
            self.batches
        }
    }

    fn data(batches: usize) -> RegressionData {
        RegressionData {
            batches,
            fail_at: None,
        }
    }

    fn cfg() -> TrainConfig {
        TrainConfig {
            epochs: 30,
            lr: 0.1,
            weight_decay: 0.0,
            warmup_steps: 5,
            max_grad_norm: 10.0,
            ..TrainConfig::default()
        }
    }

    fn out<'a>(dir: &'a Path, metrics: &'a Path) -> FitOutput<'a> {
        FitOutput {
            checkpoint_dir: dir,
            metrics_path: metrics,
            run_id: "r",
            stage: "test",
        }
    }

    #[test]
    fn schedule_warms_up_linearly_then_decays_to_zero() {
        assert_eq!(lr_at(0, 100, 10, 1.0), 0.0);
        assert!((lr_at(5, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert!(lr_at(100, 100, 10, 1.0).abs() < 1e-12);
    }

    #[test]
    fn fit_learns_and_a_nan_batch_is_skipped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = tmp.path().join("metrics.parquet");
        let mut obj = Regression::new(Some(3));
        let summary = fit(
            &mut obj,
            &data(8),
            &cfg(),
            &out(&tmp.path().join("ckpt"), &metrics),
        )
        .unwrap();
        assert_eq!(
            summary.state.skipped_nonfinite, 30,
            "one NaN batch per epoch"
        );
        let w = obj.w.to_vec1::<f32>().unwrap()[0];
        let b = obj.b.to_vec1::<f32>().unwrap()[0];
        assert!(w.is_finite() && b.is_finite());
        assert!(
            (w - 3.0).abs() < 0.1 && (b + 1.0).abs() < 0.1,
            "w {w} b {b}"
        );
        let rows: Vec<MetricRow> = crate::data::shard::read_parquet(&metrics).unwrap();
        assert!(rows.iter().any(|r| r.split == "val" && r.name == "loss"));
        let skipped = rows
            .iter()
            .filter(|r| r.name == "skipped_nonfinite_batches")
            .map(|r| r.value)
            .fold(0.0, f64::max);
        assert_eq!(skipped, 30.0);
        assert!(rows.iter().all(|r| r.value.is_finite()));
        // Every logged row is a TensorBoard scalar too, at its step.
        use tensorboard::tests::{read_events, Read};
        let dir = tmp.path().join("tensorboard/test");
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), 1);
        let events = read_events(&files[0].as_ref().unwrap().path());
        assert_eq!(events[0], Read::Version("brain.Event:2".into()));
        let mut want: Vec<(i64, String, f32)> = rows
            .iter()
            .map(|r| (r.step, tensorboard::tag(&r.split, &r.name), r.value as f32))
            .collect();
        let mut got: Vec<(i64, String, f32)> = events[1..]
            .iter()
            .map(|e| match e {
                Read::Scalar(s, t, v) => (*s, t.clone(), *v),
                other => panic!("{other:?}"),
            })
            .collect();
        let key = |x: &(i64, String, f32)| (x.0, x.1.clone(), x.2.to_bits());
        want.sort_by_key(key);
        got.sort_by_key(key);
        assert_eq!(got, want);
    }

    #[test]
    fn resuming_from_the_last_checkpoint_gives_identical_results() {
        let c = TrainConfig {
            epochs: 6,
            eval_every: 5,
            grad_accum: 2,
            ..cfg()
        };
        // The run dies in epoch 3 (its loader fails); the rerun resumes from the last
        // checkpoint and ends exactly where the uninterrupted run did.
        let (_, resumed) = killed_and_resumed(&c, 8, (3, 5));
        let from = resumed.resumed_from_step.expect("resumed");
        assert!(from > 0 && from < resumed.state.step, "{from}");
    }

    /// Trains `batches` batches per epoch under `c` uninterrupted, and again with the loader
    /// failing at `fail_at` (epoch, batch) and then rerun in the same checkpoint directory;
    /// asserts both ended with the same weights and logged the same metrics. Returns the
    /// summaries of the uninterrupted run and of the rerun.
    fn killed_and_resumed(
        c: &TrainConfig,
        batches: usize,
        fail_at: (usize, usize),
    ) -> (FitSummary, FitSummary) {
        let tmp = tempfile::tempdir().unwrap();
        let run = |dir: &Path, fail_at: Option<(usize, usize)>| {
            let mut obj = Regression::new(None);
            let data = RegressionData { batches, fail_at };
            let res = fit(&mut obj, &data, c, &out(dir, &dir.join("m.parquet")));
            (res, obj)
        };
        let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
        let (summary, a) = run(&full, None);
        assert!(run(&part, Some(fail_at)).0.is_err());
        let (resumed, b) = run(&part, None);
        // The rerun's event file tells TensorBoard where it resumed.
        let from = resumed.as_ref().unwrap().resumed_from_step;
        let starts: Vec<bool> = std::fs::read_dir(part.join("tensorboard/test"))
            .unwrap()
            .map(|f| {
                tensorboard::tests::read_events(&f.unwrap().path())
                    .iter()
                    .any(|e| {
                        Some(e)
                            == from
                                .map(|s| tensorboard::tests::Read::Start(s as i64))
                                .as_ref()
                    })
            })
            .collect();
        assert_eq!(starts.len(), 2, "one event file per process start");
        assert_eq!(
            starts.iter().filter(|s| **s).count(),
            usize::from(from.is_some())
        );
        for (x, y) in [(&a.w, &b.w), (&a.b, &b.b)] {
            assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        }
        let ma: Vec<MetricRow> = crate::data::shard::read_parquet(&full.join("m.parquet")).unwrap();
        let mb: Vec<MetricRow> = crate::data::shard::read_parquet(&part.join("m.parquet")).unwrap();
        assert_eq!(ma, mb);
        (summary.unwrap(), resumed.unwrap())
    }

    #[test]
    fn an_epochs_last_batches_step_and_resuming_there_is_exact() {
        // 7 batches, accumulation 2: each epoch steps 4 times, the last with one batch, and
        // nothing accumulated crosses into the next epoch.
        let c = TrainConfig {
            epochs: 3,
            eval_every: 0,
            grad_accum: 2,
            ..cfg()
        };
        let (full, resumed) = killed_and_resumed(&c, 7, (1, 3));
        assert_eq!(full.state.step, 12);
        assert_eq!(resumed.resumed_from_step, Some(4));
    }

    #[test]
    fn the_last_step_is_validated_when_skipped_batches_leave_the_run_short() {
        // 2 epochs of 7 batches, one NaN each: 12 steps, not the 14 whose multiple-of-5
        // validations (5, 10) would otherwise leave steps 11 and 12 unvalidated.
        let tmp = tempfile::tempdir().unwrap();
        let metrics = tmp.path().join("m.parquet");
        let mut obj = Regression::new(Some(2));
        let c = TrainConfig {
            epochs: 2,
            eval_every: 5,
            ..cfg()
        };
        let summary = fit(
            &mut obj,
            &data(7),
            &c,
            &out(&tmp.path().join("ckpt"), &metrics),
        )
        .unwrap();
        assert_eq!(summary.state.step, 12);
        let rows: Vec<MetricRow> = crate::data::shard::read_parquet(&metrics).unwrap();
        let validated: Vec<i64> = rows
            .iter()
            .filter(|r| r.split == "val" && r.name == "loss")
            .map(|r| r.step)
            .collect();
        assert_eq!(validated, [5, 10, 12]);
        let skipped = rows
            .iter()
            .filter(|r| r.split == "train" && r.name == "skipped_nonfinite_batches")
            .map(|r| r.value)
            .fold(0.0, f64::max);
        assert_eq!(skipped, 2.0);
    }

    #[test]
    fn a_validation_batch_with_a_nan_loss_is_left_out_and_counted() {
        let mut obj = Regression::new(Some(usize::MAX));
        let trainer = Trainer::new(obj.groups()).unwrap();
        let val = validate(&mut obj, &data(8), &trainer, &TrainState::default()).unwrap();
        let get = |name: &str| val.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        assert_eq!(get("skipped_nonfinite_batches"), Some(1.0));
        assert_eq!(get("loss"), None);
        let mut clean = Regression::new(None);
        let trainer = Trainer::new(clean.groups()).unwrap();
        let val = validate(&mut clean, &data(8), &trainer, &TrainState::default()).unwrap();
        assert!(val.iter().all(|(_, v)| v.is_finite()), "{val:?}");
    }

    /// Two parameter groups with their own optimisers: `d` (like a discriminator, or a
    /// critic) fits the data's mean, `g` (a generator, or a policy) chases `d`. The data are
    /// sampled inside the step from the step's own seed, as DiCO or RLHF objectives generate
    /// their candidates.
    struct Chase {
        d_vars: VarMap,
        g_vars: VarMap,
        d: Tensor,
        g: Tensor,
        lr_g: f64,
        /// `d` right after each of its updates, and `d` as each `g` step saw it.
        d_after_update: Vec<f32>,
        d_seen_by_g: Vec<f32>,
    }

    impl Chase {
        fn new(lr_g: f64) -> Self {
            let (d_vars, g_vars) = (VarMap::new(), VarMap::new());
            let d = VarBuilder::from_varmap(&d_vars, DType::F32, &Device::Cpu)
                .get_with_hints(1, "d", Init::Const(0.0))
                .unwrap();
            let g = VarBuilder::from_varmap(&g_vars, DType::F32, &Device::Cpu)
                .get_with_hints(1, "g", Init::Const(-2.0))
                .unwrap();
            Self {
                d_vars,
                g_vars,
                d,
                g,
                lr_g,
                d_after_update: Vec::new(),
                d_seen_by_g: Vec::new(),
            }
        }
        fn value(t: &Tensor) -> f32 {
            t.to_vec1::<f32>().unwrap()[0]
        }
    }

    impl Objective for Chase {
        type Batch = (usize, Vec<f32>, Vec<f32>);
        fn groups(&self) -> Vec<ParamGroup> {
            let opt = |lr: f64| OptimizerConfig {
                lr,
                weight_decay: 0.0,
                warmup_steps: 0,
                schedule: Schedule::Constant,
                ..OptimizerConfig::default()
            };
            vec![
                ParamGroup::new("d", &self.d_vars, opt(0.1)),
                ParamGroup::new("g", &self.g_vars, opt(self.lr_g)),
            ]
        }
        fn step(
            &mut self,
            batch: &Self::Batch,
            ctx: &StepContext,
        ) -> candle_core::Result<StepOutput> {
            let loss = if ctx.group == 0 {
                // Samples drawn inside the step: 3 plus noise seeded by the step.
                let mut rng = crate::rng::SplitMix64::derived(ctx.step as u64, "chase");
                let xs: Vec<f32> = (0..8)
                    .map(|_| 3.0 + (rng.unit_f64() as f32 - 0.5) * 0.1)
                    .collect();
                let x = Tensor::new(xs.as_slice(), &Device::Cpu)?;
                x.broadcast_sub(&self.d)?.sqr()?.mean_all()?
            } else {
                if ctx.train {
                    self.d_seen_by_g.push(Self::value(&self.d));
                }
                // g's loss reaches d too; only g may move for it.
                (&self.g - &self.d)?.sqr()?.mean_all()?
            };
            let _ = batch;
            Ok(StepOutput {
                loss,
                scalars: Vec::new(),
                rows: 8,
            })
        }
        fn after_update(&mut self, group: usize) -> candle_core::Result<()> {
            if group == 0 {
                self.d_after_update.push(Self::value(&self.d));
            }
            Ok(())
        }
    }

    #[test]
    fn two_groups_update_in_order_each_with_its_own_optimiser_and_loss() {
        let tmp = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            epochs: 10,
            ..TrainConfig::default()
        };
        let run = |lr_g: f64, name: &str| {
            let mut obj = Chase::new(lr_g);
            let dir = tmp.path().join(name);
            let summary = fit(&mut obj, &data(8), &c, &out(&dir, &dir.join("m.parquet"))).unwrap();
            (obj, summary, dir)
        };
        let (chase, summary, dir) = run(0.1, "both");
        assert_eq!(summary.state.step, 80);
        // Both learned: d the data's mean, g to follow d.
        let (d, g) = (Chase::value(&chase.d), Chase::value(&chase.g));
        assert!((d - 3.0).abs() < 0.05, "d {d}");
        assert!((g - d).abs() < 0.25, "g {g} (from -2) vs d {d}");
        // In order: every g step saw d as d's update of the same batch had just left it.
        assert_eq!(chase.d_seen_by_g.len(), 80);
        assert_eq!(chase.d_seen_by_g, chase.d_after_update);
        // Own optimisers: g frozen at lr 0 never moves, and d's path is the same whether g
        // learns or not, although g's loss depends on d.
        let (frozen, _, _) = run(0.0, "frozen");
        assert_eq!(Chase::value(&frozen.g), -2.0);
        assert_eq!(frozen.d_after_update, chase.d_after_update);
        // Metrics and checkpoints per group.
        let rows: Vec<MetricRow> =
            crate::data::shard::read_parquet(&dir.join("m.parquet")).unwrap();
        for name in [
            "d/loss",
            "g/loss",
            "d/lr",
            "g/lr",
            "d/grad_norm",
            "g/grad_norm",
        ] {
            assert!(
                rows.iter().any(|r| r.split == "train" && r.name == name),
                "{name}"
            );
        }
        assert!(rows.iter().any(|r| r.split == "val" && r.name == "g/loss"));
        assert!(summary.state.best_step.is_some());
        for f in [
            "model.safetensors",
            "optimizer.safetensors",
            "g.safetensors",
            "optimizer-g.safetensors",
            "state.json",
        ] {
            assert!(dir.join("last").join(f).is_file(), "{f}");
        }
        // A fresh objective resumes from that checkpoint with both groups restored.
        let mut again = Chase::new(0.1);
        let resumed = fit(&mut again, &data(8), &c, &out(&dir, &dir.join("m.parquet"))).unwrap();
        assert_eq!(resumed.resumed_from_step, Some(80));
        assert_eq!(Chase::value(&again.d), d);
        assert_eq!(Chase::value(&again.g), g);
    }
}
