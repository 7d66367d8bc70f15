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

/// A graph bound to weights, ready to run.
pub struct Network {
    ops: Vec<Op>,
}

enum Op {
    /// `wt` is `[in, out]` (W transposed once).
    Linear {
        wt: Tensor,
        bias: Option<Tensor>,
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
    Residual(Vec<Op>),
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

fn build(layers: &[Layer], w: &Weights) -> Result<Vec<Op>, ForwardError> {
    layers
        .iter()
        .map(|l| {
            Ok(match l {
                Layer::Linear { name } => {
                    Op::Linear { wt: tensor(w, name, "weight")?.t()?.contiguous()?, bias: optional(w, name, "bias")? }
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
                Layer::MaxPool2d { kernel, stride } => {
                    Op::MaxPool { kernel: *kernel, stride: stride.unwrap_or(*kernel) }
                }
                Layer::AvgPool2d { kernel, stride } => {
                    Op::AvgPool { kernel: *kernel, stride: stride.unwrap_or(*kernel) }
                }
                Layer::GlobalAvgPool2d => Op::GlobalAvgPool,
                Layer::Flatten => Op::Flatten,
                Layer::Dropout { .. } => Op::Identity,
                Layer::Residual { layers } => Op::Residual(build(layers, w)?),
            })
        })
        .collect()
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

fn run(ops: &[Op], mut x: Tensor) -> Result<Tensor, ForwardError> {
    for op in ops {
        x = match op {
            Op::Linear { wt, bias } => {
                let y = if x.rank() == 2 { x.matmul(wt)? } else { x.broadcast_matmul(wt)? };
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            Op::Conv2d { w, bias, stride, padding, dilation, groups } => {
                let y = x.conv2d(w, *padding, *stride, *dilation, *groups)?;
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
            Op::Residual(inner) => (run(inner, x.clone())? + x)?,
        };
    }
    Ok(x)
}

impl Network {
    /// Binds `graph` to `weights` (validated graphs only: [`Graph::validate`]).
    pub fn build(graph: &Graph, weights: &Weights) -> Result<Network, ForwardError> {
        Ok(Network { ops: build(&graph.layers, weights)? })
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
