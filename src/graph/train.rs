//! Training a graph on the CPU with candle's autograd: the differentiable forward pass, the
//! knowledge-distillation loss and an AdamW optimizer whose state is ours (for checkpoints).
//!
//! The forward pass uses only ops with a backward pass in candle 0.11: matmul, conv2d, pooling,
//! index_select and elementwise ops. candle's fused `layer_norm`, `rms_norm`, `softmax_last_dim`
//! and `rope` have none and silently give no gradient (candle issues #3011, #3752, #2168), so
//! layer norm and softmax are written out. Batch norm runs in inference form (running
//! statistics fixed, `weight` and `bias` trained), as when fine-tuning a deployed model.
//!
//! Loss (Hinton, Vinyals and Dean 2015): `kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) +
//! (1 - kd_weight) * CE(s, labels)`, KL and CE averaged over the batch (`batchmean`).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};

use super::forward::Weights;
use super::{Graph, Layer};

/// A graph's trainable parameters as candle variables.
pub struct Trainable {
    pub graph: Graph,
    /// Every floating-point tensor the graph reads, by name.
    pub vars: BTreeMap<String, Var>,
    /// Quantization-aware training: linear and conv weights run fake-quantized to this many
    /// bits (symmetric, one scale per row along the last dimension, as the `quantize` step's
    /// `channel` granularity stores them), with a straight-through gradient.
    pub fake_quant_bits: Option<u8>,
}

/// `w` rounded to symmetric `bits`-bit codes with one scale per row of its last dimension
/// (`absmax / ((2^bits - 1) / 2)`, the compressed-tensors convention the quantize step uses),
/// passing the gradient straight through to `w` (Bengio et al. 2013): forward
/// `w + (q(w) - w).detach()`.
pub fn fake_quantize(w: &Tensor, bits: u8) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let last = *dims.last().unwrap_or(&1);
    let rows = w.reshape((w.elem_count() / last.max(1), last))?;
    let half = (1i32 << (bits - 1)) as f64;
    let scale = (rows.abs()?.max_keepdim(1)?.detach() / (half - 0.5))?.clamp(f32::MIN_POSITIVE, f32::MAX)?;
    let q = rows.broadcast_div(&scale)?.round()?.clamp(-half, half - 1.0)?.broadcast_mul(&scale)?;
    let snapped = (&rows + (q - &rows)?.detach())?;
    snapped.reshape(dims)
}

/// `op(A) op(B)` for row-major matrices, `op` transposing when asked, on faer's gemm: a candle
/// op with a backward pass. candle 0.11's own CPU matmul runs the `gemm` crate's AVX2 kernel
/// on this machine where faer runs AVX-512 kernels; the student's forward and backward passes
/// are three of these per linear layer (`benches/graph.rs`, `kd_student_step_ms`).
#[derive(Debug, Clone, Copy)]
struct Gemm {
    ta: bool,
    tb: bool,
}

impl Gemm {
    /// Rows and columns of `op(X)` for a rank-2 `X` of `dims`.
    fn op_dims(dims: &[usize], t: bool) -> (usize, usize) {
        if t {
            (dims[1], dims[0])
        } else {
            (dims[0], dims[1])
        }
    }

    fn apply(self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &self)
    }
}

impl candle_core::CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "modelpress-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use faer::{MatMut, MatRef};
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("modelpress-gemm needs contiguous operands")
        };
        if l1.dims().len() != 2 || l2.dims().len() != 2 {
            candle_core::bail!("modelpress-gemm multiplies matrices, got {:?} and {:?}", l1.dims(), l2.dims())
        }
        let (a, b) = (&s1.as_slice::<f32>()?[a0..a1], &s2.as_slice::<f32>()?[b0..b1]);
        let (m, k) = Self::op_dims(l1.dims(), self.ta);
        let (k2, n) = Self::op_dims(l2.dims(), self.tb);
        if k != k2 {
            candle_core::bail!("modelpress-gemm: inner dimensions {k} and {k2} differ")
        }
        fn view<'a>(x: &'a [f32], dims: &[usize], t: bool) -> MatRef<'a, f32> {
            let v = MatRef::from_row_major_slice(x, dims[0], dims[1]);
            if t {
                v.transpose()
            } else {
                v
            }
        }
        let mut c = vec![0f32; m * n];
        faer::linalg::matmul::matmul(
            MatMut::from_row_major_slice_mut(&mut c, m, n),
            faer::Accum::Replace,
            view(a, l1.dims(), self.ta),
            view(b, l2.dims(), self.tb),
            1.0f32,
            if m * n * k >= super::forward::PARALLEL_MIN_MACS {
                faer::get_global_parallelism()
            } else {
                faer::Par::Seq
            },
        );
        Ok((candle_core::CpuStorage::F32(c), (m, n).into()))
    }

    /// For `C = op(A) op(B)`: `dA = dC op(B)^T` (transposed back when `A` enters transposed)
    /// and `dB = op(A)^T dC` (likewise); an operand that needs no gradient gets none.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        dc: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (ta, tb) = (self.ta, self.tb);
        let da = match (a.track_op(), ta) {
            (false, _) => None,
            (true, false) => Some(Gemm { ta: false, tb: !tb }.apply(dc, b)?),
            (true, true) => Some(Gemm { ta: tb, tb: true }.apply(b, dc)?),
        };
        let db = match (b.track_op(), tb) {
            (false, _) => None,
            (true, false) => Some(Gemm { ta: !ta, tb: false }.apply(a, dc)?),
            (true, true) => Some(Gemm { ta: true, tb: ta }.apply(dc, a)?),
        };
        Ok((da, db))
    }
}

/// `x W^T` for `x` of any rank (rows along the last dimension) and `W` `[out, in]`,
/// differentiable in both.
fn linear_xwt(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / inp.max(1);
    let y = x.contiguous()?.reshape((rows, inp))?.apply_op2(&w.contiguous()?, Gemm { ta: false, tb: true })?;
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

fn err(e: candle_core::Error) -> String {
    e.to_string()
}

impl Trainable {
    /// Variables initialised from `weights` (every tensor the graph reads).
    pub fn new(graph: &Graph, weights: &Weights) -> Result<Trainable, String> {
        let mut vars = BTreeMap::new();
        for name in graph.tensor_names() {
            if let Some((shape, values)) = weights.get(&name) {
                vars.insert(name, Var::from_slice(values, shape.as_slice(), &Device::Cpu).map_err(err)?);
            }
        }
        Ok(Trainable { graph: graph.clone(), vars, fake_quant_bits: None })
    }

    /// The trained values, as [`Weights`].
    pub fn weights(&self) -> Result<Weights, String> {
        self.vars
            .iter()
            .map(|(k, v)| {
                let t = v.as_tensor();
                Ok((k.clone(), (t.dims().to_vec(), t.flatten_all().map_err(err)?.to_vec1::<f32>().map_err(err)?)))
            })
            .collect()
    }

    /// The variables that train: running statistics of batch norms stay fixed.
    pub fn trained(&self) -> Vec<(&String, &Var)> {
        self.vars.iter().filter(|(k, _)| !(k.ends_with(".running_mean") || k.ends_with(".running_var"))).collect()
    }

    fn get(&self, layer: &str, suffix: &str) -> Option<&Tensor> {
        self.vars.get(&format!("{layer}.{suffix}")).map(Var::as_tensor)
    }

    fn need(&self, layer: &str, suffix: &str) -> Result<&Tensor, String> {
        self.get(layer, suffix).ok_or_else(|| format!("layer `{layer}` has no tensor `{layer}.{suffix}`"))
    }

    /// A linear or conv layer's weight as the forward pass uses it (fake-quantized in QAT).
    fn weight(&self, layer: &str) -> Result<Tensor, String> {
        let w = self.need(layer, "weight")?;
        match self.fake_quant_bits {
            Some(bits) => fake_quantize(w, bits).map_err(err),
            None => Ok(w.clone()),
        }
    }

    /// The differentiable forward pass of a batch `x` (`[batch, ...input shape]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, String> {
        self.run(&self.graph.layers, x.clone(), "", &mut Taps::default())
    }

    /// The forward pass, also returning the outputs of the layers at `pointers`
    /// (`/layers/2`, `/layers/3/layers/0`), in that order.
    pub fn forward_taps(&self, x: &Tensor, pointers: &[String]) -> Result<(Tensor, Vec<Tensor>), String> {
        let mut taps = Taps { want: pointers.iter().cloned().collect(), got: BTreeMap::new() };
        let y = self.run(&self.graph.layers, x.clone(), "", &mut taps)?;
        let outs = pointers
            .iter()
            .map(|p| taps.got.get(p).cloned().ok_or_else(|| format!("the graph has no layer at `{p}`")))
            .collect::<Result<_, _>>()?;
        Ok((y, outs))
    }

    fn run(&self, layers: &[Layer], mut x: Tensor, at: &str, taps: &mut Taps) -> Result<Tensor, String> {
        for (i, layer) in layers.iter().enumerate() {
            x = match layer {
                Layer::Linear { name } => {
                    let y = linear_xwt(&x, &self.weight(name)?).map_err(err)?;
                    match self.get(name, "bias") {
                        Some(b) => y.broadcast_add(b).map_err(err)?,
                        None => y,
                    }
                }
                Layer::Conv2d { name, stride, padding, dilation, groups } => {
                    let w = &self.weight(name)?;
                    let y = x.conv2d(w, *padding, *stride, *dilation, *groups).map_err(err)?;
                    match self.get(name, "bias") {
                        Some(b) => {
                            y.broadcast_add(&b.reshape((1, b.dim(0).map_err(err)?, 1, 1)).map_err(err)?).map_err(err)?
                        }
                        None => y,
                    }
                }
                Layer::BatchNorm { name, eps } => {
                    let r = x.rank();
                    let shape = |t: &Tensor| -> Result<Tensor, String> {
                        let mut s = vec![1; r];
                        s[1] = t.dim(0).map_err(err)?;
                        t.reshape(s).map_err(err)
                    };
                    let mean = shape(self.need(name, "running_mean")?)?;
                    let var = shape(self.need(name, "running_var")?)?;
                    let mut y = x
                        .broadcast_sub(&mean)
                        .map_err(err)?
                        .broadcast_div(&(var + *eps).map_err(err)?.sqrt().map_err(err)?)
                        .map_err(err)?;
                    if let Some(w) = self.get(name, "weight") {
                        y = y.broadcast_mul(&shape(w)?).map_err(err)?;
                    }
                    if let Some(b) = self.get(name, "bias") {
                        y = y.broadcast_add(&shape(b)?).map_err(err)?;
                    }
                    y
                }
                Layer::LayerNorm { name, eps } => {
                    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1).map_err(err)?).map_err(err)?;
                    let var = centered.sqr().map_err(err)?.mean_keepdim(D::Minus1).map_err(err)?;
                    let mut y =
                        centered.broadcast_div(&(var + *eps).map_err(err)?.sqrt().map_err(err)?).map_err(err)?;
                    if let Some(w) = self.get(name, "weight") {
                        y = y.broadcast_mul(w).map_err(err)?;
                    }
                    if let Some(b) = self.get(name, "bias") {
                        y = y.broadcast_add(b).map_err(err)?;
                    }
                    y
                }
                Layer::Embedding { name } => {
                    let table = self.need(name, "weight")?;
                    let (batch, len) = x.dims2().map_err(err)?;
                    let ids = x.flatten_all().map_err(err)?.to_dtype(DType::U32).map_err(err)?;
                    table
                        .index_select(&ids, 0)
                        .map_err(err)?
                        .reshape((batch, len, table.dim(1).map_err(err)?))
                        .map_err(err)?
                }
                Layer::Relu => x.relu().map_err(err)?,
                Layer::Gelu => x.gelu_erf().map_err(err)?,
                Layer::Silu => x.silu().map_err(err)?,
                Layer::Tanh => x.tanh().map_err(err)?,
                Layer::Sigmoid => x
                    .neg()
                    .and_then(|n| n.exp())
                    .and_then(|e| e.affine(1.0, 1.0))
                    .and_then(|d| d.recip())
                    .map_err(err)?,
                Layer::Softmax => log_softmax(&x).and_then(|l| l.exp()).map_err(err)?,
                Layer::MaxPool2d { kernel, stride } => {
                    x.max_pool2d_with_stride(*kernel, stride.unwrap_or(*kernel)).map_err(err)?
                }
                Layer::AvgPool2d { kernel, stride } => {
                    x.avg_pool2d_with_stride(*kernel, stride.unwrap_or(*kernel)).map_err(err)?
                }
                Layer::GlobalAvgPool2d => x.mean(3).and_then(|m| m.mean(2)).map_err(err)?,
                Layer::Flatten => x.flatten_from(1).map_err(err)?,
                Layer::Dropout { .. } => x,
                Layer::Residual { layers } => {
                    (self.run(layers, x.clone(), &format!("{at}/layers/{i}"), taps)? + x).map_err(err)?
                }
            };
            if !taps.want.is_empty() {
                let pointer = format!("{at}/layers/{i}");
                if taps.want.contains(&pointer) {
                    taps.got.insert(pointer, x.clone());
                }
            }
        }
        Ok(x)
    }
}

/// Layer outputs a forward pass records.
#[derive(Default)]
struct Taps {
    want: std::collections::BTreeSet<String>,
    got: BTreeMap<String, Tensor>,
}

/// `x - logsumexp(x)` along the last dimension, differentiable (candle's fused softmax is not).
pub fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// The distillation loss of a batch of logits `[batch, classes]`: `kd_weight * T^2 *
/// KL(softmax(teacher/T) || softmax(student/T)) + (1 - kd_weight) * CE(student, labels)`, both
/// terms averaged over the batch. Without labels `kd_weight` must be 1.
pub fn kd_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: Option<&Tensor>,
    temperature: f64,
    kd_weight: f64,
) -> candle_core::Result<Tensor> {
    let batch = student.dim(0)? as f64;
    let ls = log_softmax(&(student / temperature)?)?;
    let lt = log_softmax(&(teacher.detach() / temperature)?)?;
    let kl = (lt.exp()? * (lt - &ls)?)?.sum_all()?.affine(temperature * temperature / batch, 0.0)?;
    match labels {
        Some(l) if kd_weight < 1.0 => {
            let log_p = log_softmax(student)?;
            let picked = log_p.gather(&l.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
            let ce = picked.sum_all()?.affine(-1.0 / batch, 0.0)?;
            kl.affine(kd_weight, 0.0)? + ce.affine(1.0 - kd_weight, 0.0)?
        }
        _ => kl.affine(kd_weight, 0.0),
    }
}

/// AdamW (Loshchilov and Hutter 2019) with decoupled weight decay; its moments and step count
/// are plain data, so a checkpoint can hold them.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    /// Per variable name: first and second moments, row-major like the variable.
    pub moments: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    pub fn new(learning_rate: f64, weight_decay: f64) -> AdamW {
        AdamW { learning_rate, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, step: 0, moments: BTreeMap::new() }
    }

    /// One update of every trained variable from its gradient in `grads`, in f32 and in the
    /// order of PyTorch's `torch.optim.AdamW` (`denom = sqrt(v) / sqrt(1 - beta2^t) + eps`,
    /// `w -= lr / (1 - beta1^t) * m / denom` after `w *= 1 - lr * weight_decay`). Returns how
    /// many variables had a gradient.
    pub fn update(&mut self, model: &Trainable, grads: &candle_core::backprop::GradStore) -> Result<usize, String> {
        self.step += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let step_size = (self.learning_rate / (1.0 - self.beta1.powi(self.step as i32))) as f32;
        let sqrt_c2 = (1.0 - self.beta2.powi(self.step as i32)).sqrt() as f32;
        let (decay, eps) = ((1.0 - self.learning_rate * self.weight_decay) as f32, self.eps as f32);
        let mut updated = 0;
        for (name, var) in model.trained() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.flatten_all().map_err(err)?.to_vec1::<f32>().map_err(err)?;
            let mut w = var.as_tensor().flatten_all().map_err(err)?.to_vec1::<f32>().map_err(err)?;
            let (m, v) = self.moments.entry(name.clone()).or_insert_with(|| (vec![0.0; w.len()], vec![0.0; w.len()]));
            // Plain zipped loops over f32 slices, so the compiler vectorizes them; blocks of
            // them on every core.
            use rayon::prelude::*;
            const BLOCK: usize = 1 << 14;
            w.par_chunks_mut(BLOCK)
                .zip(m.par_chunks_mut(BLOCK))
                .zip(v.par_chunks_mut(BLOCK))
                .zip(g.par_chunks(BLOCK))
                .for_each(|(((w, m), v), g)| {
                    for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *w = *w * decay - step_size * *m / (v.sqrt() / sqrt_c2 + eps);
                    }
                });
            let t = Tensor::from_vec(w, var.as_tensor().dims(), &Device::Cpu).map_err(err)?;
            var.set(&t).map_err(err)?;
            updated += 1;
        }
        Ok(updated)
    }
}

#[cfg(test)]
mod tests;

/// What a distillation run does.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// AdamW's moment decay rates (beta1, beta2).
    pub betas: (f64, f64),
    pub temperature: f64,
    /// Weight of the KD term; `1 - kd_weight` weighs cross-entropy with the labels.
    pub kd_weight: f64,
    /// Cosine decay of the learning rate to 0 over all steps (else constant).
    pub cosine: bool,
    /// The last fraction of the samples, held out to pick the best epoch.
    pub validation_fraction: f64,
    pub seed: u64,
    /// Mean squared error between student and teacher logits instead of the KD loss (no
    /// temperature, no labels).
    pub mse: bool,
    /// Quantization-aware training to this many bits (see [`Trainable::fake_quant_bits`]).
    pub qat_bits: Option<u8>,
    /// Feature distillation (FitNets, Romero et al. 2015, without the regressor: the layers
    /// have equal widths): pairs of (teacher layer, student layer), names or pointers, whose
    /// outputs are matched by mean squared error.
    pub features: Vec<(String, String)>,
    /// Weight of the feature term, added to the logits loss.
    pub feature_weight: f64,
    /// Only the feature term trains (no logits loss).
    pub features_only: bool,
}

impl Default for DistillConfig {
    /// The `classification` preset: T = 4 and kd_weight 0.5 (Hinton et al. 2015), AdamW at 1e-3
    /// with PyTorch's betas, 10 epochs of batches of 64 with a cosine schedule, 10% held out.
    fn default() -> Self {
        DistillConfig {
            epochs: 10,
            batch_size: 64,
            learning_rate: 1e-3,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            temperature: 4.0,
            kd_weight: 0.5,
            cosine: true,
            validation_fraction: 0.1,
            seed: 0,
            mse: false,
            qat_bits: None,
            features: Vec::new(),
            feature_weight: 1.0,
            features_only: false,
        }
    }
}

/// Mean squared error between two batches of logits (mean over every entry), the teacher's
/// detached.
pub fn mse_loss(student: &Tensor, teacher: &Tensor) -> candle_core::Result<Tensor> {
    (student - teacher.detach())?.sqr()?.mean_all()
}

/// One epoch of a distillation run, for the report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub loss: f64,
    /// Accuracy on the training batches as they were trained (the running figure of the
    /// epoch, against the same target as the validation accuracy).
    #[serde(default)]
    pub train_accuracy: f64,
    /// Wall time of the epoch's training and validation, in seconds.
    #[serde(default)]
    pub seconds: f64,
    /// Accuracy on the held-out samples: against the labels, or top-1 agreement with the
    /// teacher without labels.
    pub validation_accuracy: f64,
    /// Mean cross-entropy on the held-out samples against the same target.
    #[serde(default)]
    pub validation_loss: f64,
}

/// The result of [`distill`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainingRecord {
    pub epochs: Vec<EpochRecord>,
    /// The epoch whose student was kept (best validation accuracy, then lowest validation
    /// cross-entropy, then earliest; the last one without held-out samples); 0 means the
    /// student before training was better than every epoch.
    pub best_epoch: usize,
    pub validation_accuracy_before: f64,
    pub train_samples: usize,
    pub validation_samples: usize,
    pub validated_against: String,
    /// When the run continued from a checkpoint (a crash or a lost lease before): the epoch it
    /// resumed after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_after_epoch: Option<usize>,
}

/// Everything a run needs to continue after its last finished epoch exactly as if it had not
/// stopped: the student, the optimizer's moments and step, the shuffle's RNG and order, the best
/// student so far and the records.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Progress {
    /// `{config:?}`: a checkpoint of another configuration is ignored.
    config: String,
    epoch: usize,
    step: u64,
    rng: u64,
    best: f64,
    best_loss: f64,
    best_epoch: usize,
    before: f64,
    epochs: Vec<EpochRecord>,
}

/// Writes a checkpoint atomically (temporary file, fsync, rename): a crash leaves the previous
/// one or this one, never half of one.
fn save_checkpoint(
    path: &std::path::Path,
    state: &Progress,
    student: &Weights,
    best: &Weights,
    opt: &AdamW,
    order: &[usize],
) -> Result<(), String> {
    use crate::formats::safetensors::{Dtype, SafetensorsWriter};
    let io = |e: std::io::Error| format!("writing the checkpoint {}: {e}", path.display());
    let tmp = path.with_extension("tmp");
    let mut w = SafetensorsWriter::create(&tmp).map_err(io)?;
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (prefix, weights) in [("student", student), ("best", best)] {
        for (name, (shape, values)) in weights {
            w.write(&format!("{prefix}/{name}"), Dtype::F32, shape, &f32s(values)).map_err(io)?;
        }
    }
    for (name, (m, v)) in &opt.moments {
        w.write(&format!("m/{name}"), Dtype::F32, &[m.len()], &f32s(m)).map_err(io)?;
        w.write(&format!("v/{name}"), Dtype::F32, &[v.len()], &f32s(v)).map_err(io)?;
    }
    let order: Vec<u8> = order.iter().flat_map(|i| (*i as i64).to_le_bytes()).collect();
    w.write("order", Dtype::I64, &[order.len() / 8], &order).map_err(io)?;
    let meta = BTreeMap::from([("modelpress.training".to_string(), serde_json::to_string(state).expect("JSON"))]);
    w.finish(&meta).map_err(io)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

type Restored = (Progress, Weights, Weights, BTreeMap<String, (Vec<f32>, Vec<f32>)>, Vec<usize>);

/// Reads a checkpoint written by [`save_checkpoint`] for `config`; `None` when there is none, it
/// is unreadable, or it belongs to another configuration.
fn load_checkpoint(path: &std::path::Path, config: &DistillConfig) -> Option<Restored> {
    use crate::formats::safetensors::{read_header, TensorReader};
    let header = read_header(path, u64::MAX).ok()?;
    let state: Progress = serde_json::from_str(header.metadata.get("modelpress.training")?).ok()?;
    if state.config != format!("{config:?}") {
        return None;
    }
    let mut reader = TensorReader::open(path).ok()?;
    let (mut student, mut best, mut moments, mut order) = (Weights::new(), Weights::new(), BTreeMap::new(), Vec::new());
    for t in &header.tensors {
        if t.name == "order" {
            order = reader
                .read_raw(t)
                .ok()?
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8")) as usize)
                .collect();
            continue;
        }
        let mut v = Vec::new();
        reader.read_f32(t, &mut v).ok()?;
        let (prefix, name) = t.name.split_once('/')?;
        match prefix {
            "student" => drop(student.insert(name.to_owned(), (t.shape.clone(), v))),
            "best" => drop(best.insert(name.to_owned(), (t.shape.clone(), v))),
            "m" => moments.entry(name.to_owned()).or_insert_with(|| (Vec::new(), Vec::new())).0 = v,
            "v" => moments.entry(name.to_owned()).or_insert_with(|| (Vec::new(), Vec::new())).1 = v,
            _ => return None,
        }
    }
    Some((state, student, best, moments, order))
}

/// What the teacher computed on every sample, once: the targets of a distillation.
pub struct TeacherOutputs {
    /// `[n, classes]`, row-major.
    pub logits: Vec<f32>,
    /// One per feature pair of the configuration, in its order.
    pub features: Vec<FeatureTarget>,
}

/// The outputs of one teacher layer on every sample, for the student layer at `student`.
pub struct FeatureTarget {
    /// The student layer's pointer (`/layers/2`).
    pub student: String,
    /// Values per sample.
    pub width: usize,
    /// `[n, width]`, row-major.
    pub values: Vec<f32>,
}

/// Trains `student` to match `teacher`'s logits and features (and `labels`) on `inputs` (`[n, ...sample]`),
/// keeping the weights of the epoch with the best validation accuracy. `tick(message)` is called
/// after every batch; returning false stops (the error is `"canceled"`). With `checkpoint`, the
/// state is saved there after every epoch, and a run that finds a checkpoint of the same
/// configuration continues after its epoch, ending with the same student as a run that never
/// stopped.
#[allow(clippy::too_many_arguments)]
pub fn distill(
    student: &Trainable,
    inputs: &[f32],
    sample_shape: &[usize],
    teacher: &TeacherOutputs,
    labels: Option<&[f32]>,
    config: &DistillConfig,
    checkpoint: Option<&std::path::Path>,
    tick: &mut dyn FnMut(&str) -> bool,
) -> Result<TrainingRecord, String> {
    let teacher_logits = &teacher.logits[..];
    let taps: Vec<String> = teacher.features.iter().map(|f| f.student.clone()).collect();
    let per: usize = sample_shape.iter().product();
    let n = inputs.len() / per.max(1);
    let classes = teacher_logits.len() / n.max(1);
    let validation = ((n as f64 * config.validation_fraction).round() as usize).min(n.saturating_sub(1));
    let train = n - validation;
    let tensor = |v: &[f32], rows: usize, shape: &[usize]| -> Result<Tensor, String> {
        let mut dims = vec![rows];
        dims.extend_from_slice(shape);
        Tensor::from_slice(v, dims, &Device::Cpu).map_err(err)
    };
    let (val_x, val_t) =
        (tensor(&inputs[train * per..], validation, sample_shape)?, &teacher_logits[train * classes..]);
    let val_labels: Option<Vec<u32>> = labels.map(|l| l[train..n].iter().map(|v| *v as u32).collect());
    let target: Vec<u32> = match &val_labels {
        Some(l) => l.clone(),
        None => val_t.chunks(classes).map(|r| super::eval::argmax(r) as u32).collect(),
    };
    let target_t = Tensor::from_slice(&target, (validation, 1), &Device::Cpu).map_err(err)?;
    // (accuracy, mean cross-entropy) on the held-out samples against `target`.
    let validate = |m: &Trainable| -> Result<(f64, f64), String> {
        if validation == 0 {
            return Ok((0.0, 0.0));
        }
        let logits = m.forward(&val_x)?;
        let y = logits.argmax(1).map_err(err)?.to_vec1::<u32>().map_err(err)?;
        let picked = log_softmax(&logits).and_then(|l| l.gather(&target_t, 1)).map_err(err)?;
        let ce = -(picked.sum_all().and_then(|s| s.to_scalar::<f32>()).map_err(err)? as f64) / validation as f64;
        Ok((y.iter().zip(&target).filter(|(a, b)| a == b).count() as f64 / validation as f64, ce))
    };
    let mut opt = AdamW::new(config.learning_rate, config.weight_decay);
    (opt.beta1, opt.beta2) = config.betas;
    let batches = train.div_ceil(config.batch_size.max(1));
    let total_steps = (batches * config.epochs).max(1);
    let mut rng = config.seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut order: Vec<usize> = (0..train).collect();
    let (mut before, before_loss) = validate(student)?;
    let (mut best, mut best_loss, mut best_epoch, mut best_weights) = (before, before_loss, 0, student.weights()?);
    let mut epochs = Vec::with_capacity(config.epochs);
    let mut first = 1;
    let mut resumed_after_epoch = None;
    if let Some((state, weights, best_w, moments, saved_order)) = checkpoint.and_then(|p| load_checkpoint(p, config)) {
        resumed_after_epoch = Some(state.epoch);
        for (name, (shape, values)) in weights {
            if let Some(v) = student.vars.get(&name) {
                v.set(&Tensor::from_vec(values, shape, &Device::Cpu).map_err(err)?).map_err(err)?;
            }
        }
        (opt.step, opt.moments, rng, order) = (state.step, moments, state.rng, saved_order);
        (best, best_loss, best_epoch, best_weights, before, epochs) =
            (state.best, state.best_loss, state.best_epoch, best_w, state.before, state.epochs);
        first = state.epoch + 1;
        tick(&format!("distill: resumed after epoch {}", state.epoch));
    }
    let started = std::time::Instant::now();
    for epoch in first..=config.epochs {
        // Fisher-Yates with a seeded xorshift: the same seed gives the same batches.
        for i in (1..order.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            order.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        let epoch_started = std::time::Instant::now();
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        for (b, chunk) in order.chunks(config.batch_size.max(1)).enumerate() {
            if config.cosine {
                let progress = opt.step as f64 / total_steps as f64;
                opt.learning_rate = config.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            }
            let rows = |values: &[f32], width: usize| -> Vec<f32> {
                let mut out = Vec::with_capacity(chunk.len() * width);
                for &i in chunk {
                    out.extend_from_slice(&values[i * width..(i + 1) * width]);
                }
                out
            };
            let x = tensor(&rows(inputs, per), chunk.len(), sample_shape)?;
            let tb = rows(teacher_logits, classes);
            let target: Vec<u32> = match labels {
                Some(l) => chunk.iter().map(|&i| l[i] as u32).collect(),
                None => tb.chunks(classes).map(|r| super::eval::argmax(r) as u32).collect(),
            };
            let t = Tensor::from_vec(tb, (chunk.len(), classes), &Device::Cpu).map_err(err)?;
            let l = labels.map(|_| Tensor::from_slice(&target, chunk.len(), &Device::Cpu)).transpose().map_err(err)?;
            let (y, feats) =
                if taps.is_empty() { (student.forward(&x)?, Vec::new()) } else { student.forward_taps(&x, &taps)? };
            let logits_loss = match (config.features_only, config.mse) {
                (true, _) => None,
                (false, true) => Some(mse_loss(&y, &t)),
                (false, false) => Some(kd_loss(&y, &t, l.as_ref(), config.temperature, config.kd_weight)),
            }
            .transpose()
            .map_err(err)?;
            let mut feature_loss: Option<Tensor> = None;
            for (f, s) in teacher.features.iter().zip(&feats) {
                let target = Tensor::from_vec(rows(&f.values, f.width), (chunk.len(), f.width), &Device::Cpu);
                let term = target.and_then(|t| mse_loss(&s.flatten_from(1)?, &t)).map_err(err)?;
                feature_loss = Some(match feature_loss {
                    None => term,
                    Some(sum) => (sum + term).map_err(err)?,
                });
            }
            let feature_loss = feature_loss
                .map(|f| f.affine(config.feature_weight / teacher.features.len() as f64, 0.0))
                .transpose()
                .map_err(err)?;
            let loss = match (logits_loss, feature_loss) {
                (Some(a), Some(b)) => (a + b).map_err(err)?,
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => return Err("the distillation has no loss term".into()),
            };
            let predicted = y.argmax(1).map_err(err)?.to_vec1::<u32>().map_err(err)?;
            correct += predicted.iter().zip(&target).filter(|(a, b)| a == b).count();
            let value = loss.to_scalar::<f32>().map_err(err)? as f64;
            if !value.is_finite() {
                return Err(format!(
                    "the loss became {value} at epoch {epoch}, batch {}; lower `learning_rate`",
                    b + 1
                ));
            }
            loss_sum += value;
            let grads = loss.backward().map_err(err)?;
            opt.update(student, &grads)?;
            let done = (epoch - first) * batches + b + 1;
            let left = (config.epochs + 1 - first) * batches - done;
            let eta = started.elapsed().as_secs_f64() / done as f64 * left as f64;
            if !tick(&format!(
                "distill: epoch {epoch}/{}, batch {}/{batches}, loss {value:.4}, about {eta:.0} s left",
                config.epochs,
                b + 1
            )) {
                return Err("canceled".into());
            }
        }
        let (accuracy, validation_loss) = validate(student)?;
        epochs.push(EpochRecord {
            epoch,
            loss: loss_sum / batches.max(1) as f64,
            train_accuracy: correct as f64 / train.max(1) as f64,
            seconds: epoch_started.elapsed().as_secs_f64(),
            validation_accuracy: accuracy,
            validation_loss,
        });
        // Ties in accuracy (a small held-out split has few distinct values) go to the lower
        // held-out cross-entropy.
        // Without held-out samples there is nothing to choose by: the last epoch is kept.
        if validation == 0 || accuracy > best || (accuracy == best && validation_loss < best_loss) {
            (best, best_loss, best_epoch, best_weights) = (accuracy, validation_loss, epoch, student.weights()?);
        }
        if let Some(path) = checkpoint {
            let state = Progress {
                config: format!("{config:?}"),
                epoch,
                step: opt.step,
                rng,
                best,
                best_loss,
                best_epoch,
                before,
                epochs: epochs.clone(),
            };
            save_checkpoint(path, &state, &student.weights()?, &best_weights, &opt, &order)?;
        }
    }
    for (name, (shape, values)) in best_weights {
        if let Some(v) = student.vars.get(&name) {
            v.set(&Tensor::from_vec(values, shape, &Device::Cpu).map_err(err)?).map_err(err)?;
        }
    }
    Ok(TrainingRecord {
        epochs,
        best_epoch,
        validation_accuracy_before: before,
        train_samples: train,
        validation_samples: validation,
        validated_against: if labels.is_some() { "labels" } else { "the teacher's top-1" }.into(),
        resumed_after_epoch,
    })
}
