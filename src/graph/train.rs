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
        Ok(Trainable { graph: graph.clone(), vars })
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

    /// The differentiable forward pass of a batch `x` (`[batch, ...input shape]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, String> {
        self.run(&self.graph.layers, x.clone())
    }

    fn run(&self, layers: &[Layer], mut x: Tensor) -> Result<Tensor, String> {
        for layer in layers {
            x = match layer {
                Layer::Linear { name } => {
                    let w = self.need(name, "weight")?;
                    let y = if x.rank() == 2 {
                        x.matmul(&w.t().map_err(err)?)
                    } else {
                        x.broadcast_matmul(&w.t().map_err(err)?)
                    }
                    .map_err(err)?;
                    match self.get(name, "bias") {
                        Some(b) => y.broadcast_add(b).map_err(err)?,
                        None => y,
                    }
                }
                Layer::Conv2d { name, stride, padding, dilation, groups } => {
                    let w = self.need(name, "weight")?;
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
                Layer::Residual { layers } => (self.run(layers, x.clone())? + x).map_err(err)?,
            };
        }
        Ok(x)
    }
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

    /// One update of every trained variable from its gradient in `grads`. Returns how many
    /// variables had a gradient.
    pub fn update(&mut self, model: &Trainable, grads: &candle_core::backprop::GradStore) -> Result<usize, String> {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        let mut updated = 0;
        for (name, var) in model.trained() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.flatten_all().map_err(err)?.to_vec1::<f32>().map_err(err)?;
            let mut w = var.as_tensor().flatten_all().map_err(err)?.to_vec1::<f32>().map_err(err)?;
            let (m, v) = self.moments.entry(name.clone()).or_insert_with(|| (vec![0.0; w.len()], vec![0.0; w.len()]));
            let (lr, wd, eps) = (self.learning_rate, self.weight_decay, self.eps);
            for i in 0..w.len() {
                let gi = g[i] as f64;
                m[i] = (b1 * m[i] as f64 + (1.0 - b1) * gi) as f32;
                v[i] = (b2 * v[i] as f64 + (1.0 - b2) * gi * gi) as f32;
                let mh = m[i] as f64 / c1;
                let vh = v[i] as f64 / c2;
                w[i] = (w[i] as f64 * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + eps)) as f32;
            }
            let t = Tensor::from_vec(w, var.as_tensor().dims(), &Device::Cpu).map_err(err)?;
            var.set(&t).map_err(err)?;
            updated += 1;
        }
        Ok(updated)
    }
}

#[cfg(test)]
mod tests;
