//! Runs a graph with candle on the CPU, batch first: `[batch, ...input shape]` in, logits out.
//!
//! Layers follow PyTorch's definitions (`torch.nn`): Linear `y = x W^T + b`; Conv2d with zero
//! padding, dilation and groups; BatchNorm in inference mode `(x - running_mean) /
//! sqrt(running_var + eps) * weight + bias` over dimension 1; LayerNorm over the last dimension;
//! GELU exact (erf); pooling without padding, floor mode. Weights are copied into candle tensors
//! once, when the network is built; matrices are pre-transposed so every batch is one gemm.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};

use super::{Graph, Layer};

/// Float values of the tensors a network reads, by name: `(shape, row-major values)`.
pub type Weights = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Every floating-point tensor of a safetensors file, as f32 [`Weights`].
pub fn read_weights(path: &std::path::Path) -> std::io::Result<Weights> {
    let header =
        crate::formats::safetensors::read_header(path, u64::MAX).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut reader = crate::formats::safetensors::TensorReader::open(path)?;
    let mut out = Weights::new();
    for t in header.tensors.iter().filter(|t| t.dtype.is_float()) {
        let mut values = Vec::new();
        reader.read_f32(t, &mut values)?;
        out.insert(t.name.clone(), (t.shape.clone(), values));
    }
    Ok(out)
}

/// A graph bound to weights, ready to run.
pub struct Network {
    ops: Vec<(usize, Op)>,
}

/// One step of a built network; ops are paired with the index of the last graph layer they
/// compute (a linear fused with the ReLU after it stands for the ReLU).
enum Op {
    /// `y = x W^T + b`, then ReLU when `relu`: one gemm into a buffer that starts as the bias.
    Linear {
        w: Vec<f32>,
        out: usize,
        inp: usize,
        bias: Option<Vec<f32>>,
        relu: bool,
    },
    Conv2d {
        w: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
    },
    /// Batch norm folded into `x * scale + shift` per channel (dimension 1); both `[C]`.
    Channel {
        scale: Tensor,
        shift: Tensor,
    },
    LayerNorm {
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        eps: f64,
    },
    Embedding {
        table: Tensor,
    },
    Relu,
    Gelu,
    Silu,
    Tanh,
    Sigmoid,
    Softmax,
    MaxPool {
        kernel: usize,
        stride: usize,
    },
    AvgPool {
        kernel: usize,
        stride: usize,
    },
    GlobalAvgPool,
    Flatten,
    Identity,
    Residual(Vec<(usize, Op)>),
}

/// Why a network could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("layer `{0}` needs tensor `{1}`, which the weights do not hold")]
    Missing(String, String),
    #[error("{0}")]
    Input(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

fn tensor(w: &Weights, layer: &str, suffix: &str) -> Result<Tensor, ForwardError> {
    let name = format!("{layer}.{suffix}");
    let (shape, values) = w.get(&name).ok_or_else(|| ForwardError::Missing(layer.into(), name.clone()))?;
    Ok(Tensor::from_slice(values, shape.as_slice(), &Device::Cpu)?)
}

fn optional(w: &Weights, layer: &str, suffix: &str) -> Result<Option<Tensor>, ForwardError> {
    if w.contains_key(&format!("{layer}.{suffix}")) {
        tensor(w, layer, suffix).map(Some)
    } else {
        Ok(None)
    }
}

fn values(w: &Weights, layer: &str, suffix: &str) -> Option<(Vec<usize>, Vec<f32>)> {
    w.get(&format!("{layer}.{suffix}")).cloned()
}

fn build(layers: &[Layer], w: &Weights) -> Result<Vec<(usize, Op)>, ForwardError> {
    let mut ops = Vec::with_capacity(layers.len());
    let mut i = 0;
    while i < layers.len() {
        let op = build_one(&layers[i], w)?;
        // A ReLU right after a linear runs in the linear's output pass.
        let op = match (op, layers.get(i + 1)) {
            (Op::Linear { w, out, inp, bias, relu: false }, Some(Layer::Relu)) => {
                i += 1;
                Op::Linear { w, out, inp, bias, relu: true }
            }
            (op, _) => op,
        };
        ops.push((i, op));
        i += 1;
    }
    Ok(ops)
}

fn build_one(l: &Layer, w: &Weights) -> Result<Op, ForwardError> {
    Ok(match l {
        Layer::Linear { name } => {
            let (shape, weight) = values(w, name, "weight")
                .ok_or_else(|| ForwardError::Missing(name.clone(), format!("{name}.weight")))?;
            Op::Linear {
                w: weight,
                out: shape[0],
                inp: shape[1],
                bias: values(w, name, "bias").map(|b| b.1),
                relu: false,
            }
        }
        Layer::Conv2d { name, stride, padding, dilation, groups } => Op::Conv2d {
            w: tensor(w, name, "weight")?,
            bias: optional(w, name, "bias")?,
            stride: *stride,
            padding: *padding,
            dilation: *dilation,
            groups: *groups,
        },
        Layer::BatchNorm { name, eps } => {
            let mean = tensor(w, name, "running_mean")?;
            let var = tensor(w, name, "running_var")?;
            let ones = || Tensor::ones_like(&mean);
            let weight = optional(w, name, "weight")?.map_or_else(ones, Ok)?;
            let bias = optional(w, name, "bias")?.map_or_else(|| Tensor::zeros_like(&mean), Ok)?;
            let scale = (weight / (var + *eps)?.sqrt()?)?;
            let shift = (bias - (mean * &scale)?)?;
            Op::Channel { scale, shift }
        }
        Layer::LayerNorm { name, eps } => {
            Op::LayerNorm { weight: optional(w, name, "weight")?, bias: optional(w, name, "bias")?, eps: *eps }
        }
        Layer::Embedding { name } => Op::Embedding { table: tensor(w, name, "weight")? },
        Layer::Relu => Op::Relu,
        Layer::Gelu => Op::Gelu,
        Layer::Silu => Op::Silu,
        Layer::Tanh => Op::Tanh,
        Layer::Sigmoid => Op::Sigmoid,
        Layer::Softmax => Op::Softmax,
        Layer::MaxPool2d { kernel, stride } => Op::MaxPool { kernel: *kernel, stride: stride.unwrap_or(*kernel) },
        Layer::AvgPool2d { kernel, stride } => Op::AvgPool { kernel: *kernel, stride: stride.unwrap_or(*kernel) },
        Layer::GlobalAvgPool2d => Op::GlobalAvgPool,
        Layer::Flatten => Op::Flatten,
        Layer::Dropout { .. } => Op::Identity,
        Layer::Residual { layers } => Op::Residual(build(layers, w)?),
    })
}

/// Below this many multiply-adds a linear layer runs on one thread: splitting a gemm across
/// threads costs more than it saves at these sizes (the digits MLP at batch 256, whose largest
/// layer is 2^24, ran 1.5x faster on one thread than on two).
pub(super) const PARALLEL_MIN_MACS: usize = 1 << 25;

/// `y = x W^T + b` (then ReLU) for `x` holding rows of `inp` values: faer's gemm accumulates into
/// a buffer that starts as the bias, so the bias costs no pass and the output one allocation.
fn linear(
    x: &Tensor,
    w: &[f32],
    out: usize,
    inp: usize,
    bias: Option<&[f32]>,
    relu: bool,
) -> Result<Tensor, ForwardError> {
    use faer::{MatMut, MatRef};
    let x = x.contiguous()?;
    let rows = x.elem_count() / inp.max(1);
    let mut y = Vec::with_capacity(rows * out);
    match bias {
        Some(b) => (0..rows).for_each(|_| y.extend_from_slice(b)),
        None => y.resize(rows * out, 0.0),
    }
    {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(ForwardError::Input("the forward pass runs on the CPU".into()));
        };
        let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..][..rows * inp];
        faer::linalg::matmul::matmul(
            MatMut::from_row_major_slice_mut(&mut y, rows, out),
            faer::Accum::Add,
            MatRef::from_row_major_slice(xs, rows, inp),
            MatRef::from_row_major_slice(w, out, inp).transpose(),
            1.0f32,
            if rows * inp * out >= PARALLEL_MIN_MACS { faer::get_global_parallelism() } else { faer::Par::Seq },
        );
    }
    if relu {
        y.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = out;
    Ok(Tensor::from_vec(y, dims, &Device::Cpu)?)
}

/// Conv2d as im2col and one gemm per group: the patches of every output position are laid out
/// as rows (`[batch * oh * ow, c_in/groups * kh * kw]`, zero padding included) and multiplied by
/// the group's filters; depthwise convolutions run as direct loops. candle's direct CPU
/// convolution is several times slower (candle issue #3119) and runs grouped convolutions one
/// chunk at a time.
fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor, ForwardError> {
    use rayon::prelude::*;
    let (b, c, h, wd) = x.dims4()?;
    let (oc, icg, kh, kw) = w.dims4()?;
    let out = |size: usize, k: usize| (size + 2 * padding - dilation * (k - 1) - 1) / stride + 1;
    let (oh, ow) = (out(h, kh), out(wd, kw));
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    if icg == 1 && oc == c {
        // Depthwise: each output plane reads one input plane; direct loops over the planes beat
        // one tiny gemm per channel.
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; b * oc * oh * ow];
        y.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, out)| {
            let input = &xs[plane * h * wd..][..h * wd];
            let taps = &ws[(plane % c) * kh * kw..][..kh * kw];
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = 0f32;
                    for a in 0..kh {
                        let yy = (i * stride + a * dilation) as isize - padding as isize;
                        if yy < 0 || yy as usize >= h {
                            continue;
                        }
                        let row = &input[yy as usize * wd..][..wd];
                        for bb in 0..kw {
                            let xx = (j * stride + bb * dilation) as isize - padding as isize;
                            if xx >= 0 && (xx as usize) < wd {
                                acc += taps[a * kw + bb] * row[xx as usize];
                            }
                        }
                    }
                    out[i * ow + j] = acc;
                }
            }
        });
        return Ok(Tensor::from_vec(y, (b, oc, oh, ow), &Device::Cpu)?);
    }
    let ocg = oc / groups;
    let patch = icg * kh * kw;
    let positions = oh * ow;
    let mut outputs = Vec::with_capacity(groups);
    for g in 0..groups {
        // cols[(n * positions + p) * patch + (ci * kh + a) * kw + bb]
        let mut cols = vec![0f32; b * positions * patch];
        cols.par_chunks_mut(positions * patch).enumerate().for_each(|(n, sample)| {
            for ci in 0..icg {
                let plane = &xs[((n * c) + g * icg + ci) * h * wd..][..h * wd];
                for a in 0..kh {
                    for bb in 0..kw {
                        let col = (ci * kh + a) * kw + bb;
                        for i in 0..oh {
                            let y = (i * stride + a * dilation) as isize - padding as isize;
                            if y < 0 || y as usize >= h {
                                continue;
                            }
                            let row = &plane[y as usize * wd..][..wd];
                            for j in 0..ow {
                                let xx = (j * stride + bb * dilation) as isize - padding as isize;
                                if xx >= 0 && (xx as usize) < wd {
                                    sample[(i * ow + j) * patch + col] = row[xx as usize];
                                }
                            }
                        }
                    }
                }
            }
        });
        let cols = Tensor::from_vec(cols, (b * positions, patch), &Device::Cpu)?;
        let wg = w.narrow(0, g * ocg, ocg)?.reshape((ocg, patch))?.t()?;
        // [b * positions, ocg] -> [b, ocg, oh, ow]
        let y = cols.matmul(&wg)?.reshape((b, positions, ocg))?.transpose(1, 2)?;
        outputs.push(y);
    }
    let y = if groups == 1 { outputs.pop().expect("one group") } else { Tensor::cat(&outputs, 1)? };
    Ok(y.contiguous()?.reshape((b, oc, oh, ow))?)
}

/// `[C]` reshaped to broadcast over dimension 1 of a rank-`rank` batch.
fn per_channel(v: &Tensor, rank: usize) -> candle_core::Result<Tensor> {
    let mut shape = vec![1; rank];
    shape[1] = v.dim(0)?;
    v.reshape(shape)
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Layer outputs a traced run hands out: pointer -> (dims with the batch first, values).
pub type Trace = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Records the outputs of the layers at `want` while a network runs.
struct Tracer<'a> {
    want: &'a std::collections::BTreeSet<String>,
    out: Trace,
}

fn run(ops: &[(usize, Op)], x: Tensor) -> Result<Tensor, ForwardError> {
    run_at(ops, x, "", &mut None)
}

fn run_at(
    ops: &[(usize, Op)],
    mut x: Tensor,
    at: &str,
    tracer: &mut Option<Tracer<'_>>,
) -> Result<Tensor, ForwardError> {
    for (i, op) in ops {
        let pointer = tracer.as_ref().map(|_| format!("{at}/layers/{i}"));
        x = match op {
            Op::Linear { w, out, inp, bias, relu } => linear(&x, w, *out, *inp, bias.as_deref(), *relu)?,
            Op::Conv2d { w, bias, stride, padding, dilation, groups } => {
                let y = conv2d(&x, w, *stride, *padding, *dilation, *groups)?;
                match bias {
                    Some(b) => y.broadcast_add(&per_channel(b, 4)?)?,
                    None => y,
                }
            }
            Op::Channel { scale, shift } => {
                let r = x.rank();
                x.broadcast_mul(&per_channel(scale, r)?)?.broadcast_add(&per_channel(shift, r)?)?
            }
            Op::LayerNorm { weight, bias, eps } => {
                let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                let mut y = centered.broadcast_div(&(var + *eps)?.sqrt()?)?;
                if let Some(w) = weight {
                    y = y.broadcast_mul(w)?;
                }
                if let Some(b) = bias {
                    y = y.broadcast_add(b)?;
                }
                y
            }
            Op::Embedding { table } => {
                let (batch, len) = x.dims2()?;
                let vocab = table.dim(0)?;
                let ids = x.flatten_all()?.to_vec1::<f32>()?;
                if let Some(bad) = ids.iter().find(|v| !(v.fract() == 0.0 && **v >= 0.0 && (**v as usize) < vocab)) {
                    return Err(ForwardError::Input(format!(
                        "token id {bad} is not an integer in [0, {vocab}) (the embedding's vocabulary)"
                    )));
                }
                let ids =
                    Tensor::from_vec(ids.iter().map(|v| *v as u32).collect::<Vec<u32>>(), batch * len, &Device::Cpu)?;
                table.index_select(&ids, 0)?.reshape((batch, len, table.dim(1)?))?
            }
            Op::Relu => x.relu()?,
            Op::Gelu => x.gelu_erf()?,
            Op::Silu => x.silu()?,
            Op::Tanh => x.tanh()?,
            Op::Sigmoid => x.neg()?.exp()?.affine(1.0, 1.0)?.recip()?,
            Op::Softmax => softmax_last(&x)?,
            Op::MaxPool { kernel, stride } => x.max_pool2d_with_stride(*kernel, *stride)?,
            Op::AvgPool { kernel, stride } => x.avg_pool2d_with_stride(*kernel, *stride)?,
            Op::GlobalAvgPool => x.mean(3)?.mean(2)?,
            Op::Flatten => x.flatten_from(1)?,
            Op::Identity => x,
            Op::Residual(inner) => (run_at(inner, x.clone(), pointer.as_deref().unwrap_or(""), tracer)? + x)?,
        };
        if let (Some(t), Some(p)) = (tracer.as_mut(), pointer) {
            if t.want.contains(&p) {
                t.out.insert(p, (x.dims().to_vec(), x.flatten_all()?.to_vec1::<f32>()?));
            }
        }
    }
    Ok(x)
}

impl Network {
    /// Binds `graph` to `weights` (validated graphs only: [`Graph::validate`]).
    pub fn build(graph: &Graph, weights: &Weights) -> Result<Network, ForwardError> {
        Ok(Network { ops: build(&graph.layers, weights)? })
    }

    /// Runs one batch and returns the outputs of the layers at the pointers `want`
    /// (`/layers/2`, `/layers/3/layers/0`), for measuring activations.
    pub fn trace(
        &self,
        inputs: &[f32],
        batch: usize,
        input_shape: &[usize],
        want: &std::collections::BTreeSet<String>,
    ) -> Result<Trace, ForwardError> {
        let mut shape = vec![batch];
        shape.extend_from_slice(input_shape);
        let x = Tensor::from_slice(inputs, shape.as_slice(), &Device::Cpu)?;
        let mut tracer = Some(Tracer { want, out: Trace::new() });
        run_at(&self.ops, x, "", &mut tracer)?;
        Ok(tracer.expect("set above").out)
    }

    /// Runs one batch: `inputs` holds `batch` samples of the graph's input shape, row-major.
    /// Returns the outputs as `(shape with the batch first, values)`.
    pub fn forward(
        &self,
        inputs: &[f32],
        batch: usize,
        input_shape: &[usize],
    ) -> Result<(Vec<usize>, Vec<f32>), ForwardError> {
        let mut shape = vec![batch];
        shape.extend_from_slice(input_shape);
        let x = Tensor::from_slice(inputs, shape.as_slice(), &Device::Cpu)?;
        let y = run(&self.ops, x)?;
        let dims = y.dims().to_vec();
        Ok((dims, y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
    }
}
