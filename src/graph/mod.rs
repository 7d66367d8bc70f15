//! Architecture graphs: what a model computes, so ModelPress can run it (evaluation) and rewrite
//! it consistently (structural steps).
//!
//! A graph is JSON: the per-sample input shape and a sequence of layers, with nested residual
//! blocks (`y = x + f(x)`). Parametrized layers find their weights by `name` in PyTorch's
//! `state_dict` naming: `fc1` -> `fc1.weight` `[out, in]`, `fc1.bias` `[out]`; a conv2d weight is
//! `[out, in / groups, kh, kw]`; batch norm has `.weight`, `.bias`, `.running_mean`, `.running_var`
//! (and the buffer `.num_batches_tracked`). Shapes come from the model file, never the graph.
//!
//! ```json
//! {"input": {"shape": [1, 8, 8]},
//!  "layers": [{"kind": "conv2d", "name": "conv1", "padding": 1}, {"kind": "relu"},
//!             {"kind": "residual", "layers": [{"kind": "conv2d", "name": "b1.conv", "padding": 1}]},
//!             {"kind": "max_pool2d", "kernel": 2}, {"kind": "flatten"}, {"kind": "linear", "name": "fc"}]}
//! ```
//!
//! [`Graph::parse`] checks the JSON, [`Graph::validate`] checks it against a model's tensors
//! (every referenced tensor exists, shapes chain from input to output); every error names the
//! layer's JSON pointer (`/layers/3/layers/0`).

pub mod eval;
pub mod forward;
pub mod lowrank;
pub mod structure;
pub mod train;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::formats::safetensors::Dtype;

/// Most layers a graph may have (nested ones included).
pub const MAX_LAYERS: usize = 10_000;
/// Deepest nesting of residual blocks.
pub const MAX_DEPTH: usize = 32;

/// A validated-as-JSON architecture description.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Graph {
    pub input: Input,
    pub layers: Vec<Layer>,
}

/// The per-sample input: its shape without the batch dimension (`[64]` for an MLP on 8x8
/// images, `[1, 8, 8]` for a CNN, `[T]` token ids for an embedding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub shape: Vec<usize>,
}

fn one() -> usize {
    1
}

fn norm_eps() -> f64 {
    1e-5
}

/// One layer. Defaults follow PyTorch (`stride` 1, `padding` 0, `eps` 1e-5, pooling stride =
/// kernel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Layer {
    Linear {
        name: String,
    },
    Conv2d {
        name: String,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        padding: usize,
        #[serde(default = "one")]
        dilation: usize,
        #[serde(default = "one")]
        groups: usize,
    },
    BatchNorm {
        name: String,
        #[serde(default = "norm_eps")]
        eps: f64,
    },
    LayerNorm {
        name: String,
        #[serde(default = "norm_eps")]
        eps: f64,
    },
    Embedding {
        name: String,
    },
    Relu,
    Gelu,
    Silu,
    Tanh,
    Sigmoid,
    Softmax,
    MaxPool2d {
        kernel: usize,
        stride: Option<usize>,
    },
    AvgPool2d {
        kernel: usize,
        stride: Option<usize>,
    },
    GlobalAvgPool2d,
    Flatten,
    Dropout {
        #[serde(default)]
        p: f64,
    },
    Residual {
        layers: Vec<Layer>,
    },
}

const KINDS: &str = "linear, conv2d, batch_norm, layer_norm, embedding, relu, gelu, silu, tanh, sigmoid, softmax, max_pool2d, avg_pool2d, global_avg_pool2d, flatten, dropout, residual";

impl Layer {
    /// The `kind` name.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Linear { .. } => "linear",
            Layer::Conv2d { .. } => "conv2d",
            Layer::BatchNorm { .. } => "batch_norm",
            Layer::LayerNorm { .. } => "layer_norm",
            Layer::Embedding { .. } => "embedding",
            Layer::Relu => "relu",
            Layer::Gelu => "gelu",
            Layer::Silu => "silu",
            Layer::Tanh => "tanh",
            Layer::Sigmoid => "sigmoid",
            Layer::Softmax => "softmax",
            Layer::MaxPool2d { .. } => "max_pool2d",
            Layer::AvgPool2d { .. } => "avg_pool2d",
            Layer::GlobalAvgPool2d => "global_avg_pool2d",
            Layer::Flatten => "flatten",
            Layer::Dropout { .. } => "dropout",
            Layer::Residual { .. } => "residual",
        }
    }

    /// The weight-bearing module name, for parametrized layers.
    pub fn name(&self) -> Option<&str> {
        match self {
            Layer::Linear { name }
            | Layer::Conv2d { name, .. }
            | Layer::BatchNorm { name, .. }
            | Layer::LayerNorm { name, .. }
            | Layer::Embedding { name } => Some(name),
            Layer::Relu
            | Layer::Gelu
            | Layer::Silu
            | Layer::Tanh
            | Layer::Sigmoid
            | Layer::Softmax
            | Layer::MaxPool2d { .. }
            | Layer::AvgPool2d { .. }
            | Layer::GlobalAvgPool2d
            | Layer::Flatten
            | Layer::Dropout { .. }
            | Layer::Residual { .. } => None,
        }
    }
}

/// One problem in a graph: the layer's JSON pointer and what does not fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GraphError {
    pub pointer: String,
    pub detail: String,
}

impl GraphError {
    fn new(pointer: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { pointer: pointer.into(), detail: detail.into() }
    }
}

impl std::fmt::Display for GraphError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", if self.pointer.is_empty() { "/" } else { &self.pointer }, self.detail)
    }
}

/// What a tensor looks like to validation: its dtype and shape.
pub type TensorTable = BTreeMap<String, (Dtype, Vec<usize>)>;

/// The tensor table of a safetensors header.
pub fn tensor_table(header: &crate::formats::safetensors::Header) -> TensorTable {
    header.tensors.iter().map(|t| (t.name.clone(), (t.dtype, t.shape.clone()))).collect()
}

/// One layer as validation saw it, in execution order (nested layers included).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerShape {
    pub pointer: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub shape_in: Vec<usize>,
    pub shape_out: Vec<usize>,
    /// Parameters of its tensors (weights, biases, norm statistics).
    pub parameters: u64,
}

/// What a valid graph computes on a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GraphSummary {
    pub input_shape: Vec<usize>,
    pub output_shape: Vec<usize>,
    pub layers: Vec<LayerShape>,
    pub parameters: u64,
    /// Tensors of the model no layer reads (they are kept in outputs as they are).
    pub unused_tensors: Vec<String>,
}

impl GraphSummary {
    /// The layer named `item` (a weighted layer's name) or at the pointer `item`.
    pub fn layer(&self, item: &str) -> Option<&LayerShape> {
        self.layers.iter().find(|l| l.pointer == item || l.name.as_deref() == Some(item))
    }
}

impl Graph {
    /// Parses a graph; every error names its JSON pointer. Unknown kinds and fields, missing
    /// names and zero sizes are refused here; shapes are checked by [`Graph::validate`].
    pub fn parse(value: &Value) -> Result<Graph, Vec<GraphError>> {
        let obj = value.as_object().ok_or_else(|| vec![GraphError::new("", "a graph must be a JSON object")])?;
        let mut errors = Vec::new();
        if let Some(k) = obj.keys().find(|k| *k != "input" && *k != "layers") {
            errors.push(GraphError::new(format!("/{k}"), format!("unknown field `{k}`, expected `input`, `layers`")));
        }
        let input = match obj.get("input") {
            None => {
                errors
                    .push(GraphError::new("/input", "missing field `input` (`{\"shape\": [...]}` without the batch)"));
                None
            }
            Some(v) => match serde_json::from_value::<Input>(v.clone()) {
                Ok(i) if i.shape.is_empty() || i.shape.contains(&0) => {
                    errors
                        .push(GraphError::new("/input/shape", "the input shape needs at least one dimension, none 0"));
                    None
                }
                Ok(i) => Some(i),
                Err(e) => {
                    errors.push(GraphError::new("/input", e.to_string()));
                    None
                }
            },
        };
        let mut count = 0;
        let layers = match obj.get("layers") {
            Some(Value::Array(items)) => parse_layers(items, "", 0, &mut count, &mut errors),
            Some(_) => {
                errors.push(GraphError::new("/layers", "`layers` must be an array"));
                Vec::new()
            }
            None => {
                errors.push(GraphError::new("/layers", "missing field `layers`"));
                Vec::new()
            }
        };
        if errors.is_empty() && layers.is_empty() {
            errors.push(GraphError::new("/layers", "a graph needs at least one layer"));
        }
        match (input, errors.is_empty()) {
            (Some(input), true) => Ok(Graph { input, layers }),
            _ => Err(errors),
        }
    }

    /// Checks the graph against a model's tensors and infers every layer's shapes. Errors name
    /// the layer's pointer and what does not fit; all of them are reported, not just the first
    /// (after a shape error, later layers are not checked: their input is unknown).
    pub fn validate(&self, tensors: &TensorTable) -> Result<GraphSummary, Vec<GraphError>> {
        let mut v = Validator {
            tensors,
            used: BTreeSet::new(),
            names: BTreeMap::new(),
            layers: Vec::new(),
            errors: Vec::new(),
        };
        let out = v.chain(&self.layers, "", self.input.shape.clone());
        if !v.errors.is_empty() {
            return Err(v.errors);
        }
        let out = out.expect("no errors means an output shape");
        let parameters = v.layers.iter().map(|l| l.parameters).sum();
        let unused_tensors = tensors.keys().filter(|k| !v.used.contains(*k)).cloned().collect();
        Ok(GraphSummary {
            input_shape: self.input.shape.clone(),
            output_shape: out,
            layers: v.layers,
            parameters,
            unused_tensors,
        })
    }

    /// A graph as stored with a model (validated when it was attached).
    pub fn from_stored(text: &str) -> Result<Graph, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("stored graph is not JSON: {e}"))?;
        Graph::parse(&value).map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    }

    /// Every tensor name the graph's layers may read (whether or not the model has it).
    pub fn tensor_names(&self) -> BTreeSet<String> {
        fn walk(layers: &[Layer], out: &mut BTreeSet<String>) {
            for l in layers {
                if let Layer::Residual { layers } = l {
                    walk(layers, out);
                }
                if let Some(n) = l.name() {
                    for suffix in ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"] {
                        out.insert(format!("{n}.{suffix}"));
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.layers, &mut out);
        out
    }
}

fn parse_layers(
    items: &[Value],
    at: &str,
    depth: usize,
    count: &mut usize,
    errors: &mut Vec<GraphError>,
) -> Vec<Layer> {
    let mut layers = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let p = format!("{at}/layers/{i}");
        *count += 1;
        if *count > MAX_LAYERS {
            errors.push(GraphError::new(p, format!("a graph may have at most {MAX_LAYERS} layers")));
            return layers;
        }
        if let Some(layer) = parse_layer(item, &p, depth, count, errors) {
            layers.push(layer);
        }
    }
    layers
}

fn parse_layer(
    value: &Value,
    at: &str,
    depth: usize,
    count: &mut usize,
    errors: &mut Vec<GraphError>,
) -> Option<Layer> {
    let Some(obj) = value.as_object() else {
        errors.push(GraphError::new(at, "a layer must be a JSON object"));
        return None;
    };
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        Some(_) => {
            errors.push(GraphError::new(format!("{at}/kind"), "`kind` must be a string"));
            return None;
        }
        None => {
            errors.push(GraphError::new(format!("{at}/kind"), format!("missing field `kind` (one of {KINDS})")));
            return None;
        }
    };
    if kind == "residual" {
        if depth >= MAX_DEPTH {
            errors.push(GraphError::new(at, format!("residual blocks nest at most {MAX_DEPTH} deep")));
            return None;
        }
        if let Some(k) = obj.keys().find(|k| *k != "kind" && *k != "layers") {
            errors.push(GraphError::new(format!("{at}/{k}"), format!("unknown field `{k}` of a residual block")));
            return None;
        }
        let Some(Value::Array(items)) = obj.get("layers") else {
            errors.push(GraphError::new(format!("{at}/layers"), "a residual block needs a `layers` array"));
            return None;
        };
        if items.is_empty() {
            errors.push(GraphError::new(format!("{at}/layers"), "a residual block needs at least one layer"));
            return None;
        }
        let layers = parse_layers(items, at, depth + 1, count, errors);
        return Some(Layer::Residual { layers });
    }
    match serde_json::from_value::<Layer>(value.clone()) {
        Ok(layer) => {
            // Field-less kinds (`relu`) are unit variants, which serde lets take any field: every
            // key must be one the kind serialises back.
            let known = serde_json::to_value(&layer).expect("layers serialise");
            if let Some(k) = obj.keys().find(|k| known.get(k.as_str()).is_none()) {
                errors.push(GraphError::new(format!("{at}/{k}"), format!("{kind}: unknown field `{k}`")));
                return None;
            }
            let zero = match &layer {
                Layer::Conv2d { stride, dilation, groups, .. } => {
                    [("stride", *stride), ("dilation", *dilation), ("groups", *groups)]
                        .into_iter()
                        .find(|(_, v)| *v == 0)
                }
                Layer::MaxPool2d { kernel, stride } | Layer::AvgPool2d { kernel, stride } => {
                    [("kernel", *kernel), ("stride", stride.unwrap_or(1))].into_iter().find(|(_, v)| *v == 0)
                }
                _ => None,
            };
            if let Some((field, _)) = zero {
                errors.push(GraphError::new(format!("{at}/{field}"), format!("`{field}` must be at least 1")));
                return None;
            }
            // Defaults are filled in, so a stored graph says what runs.
            let layer = match layer {
                Layer::MaxPool2d { kernel, stride: None } => Layer::MaxPool2d { kernel, stride: Some(kernel) },
                Layer::AvgPool2d { kernel, stride: None } => Layer::AvgPool2d { kernel, stride: Some(kernel) },
                other => other,
            };
            match &layer {
                Layer::BatchNorm { eps, .. } | Layer::LayerNorm { eps, .. } if !(eps.is_finite() && *eps > 0.0) => {
                    errors.push(GraphError::new(
                        format!("{at}/eps"),
                        format!("`eps` must be a positive number, got {eps}"),
                    ));
                    None
                }
                Layer::Dropout { p } if !(0.0..1.0).contains(p) => {
                    errors.push(GraphError::new(format!("{at}/p"), format!("`p` must be in [0, 1), got {p}")));
                    None
                }
                _ => match layer.name() {
                    Some("") => {
                        errors.push(GraphError::new(format!("{at}/name"), "`name` must not be empty"));
                        None
                    }
                    _ => Some(layer),
                },
            }
        }
        Err(e) => {
            let msg = e.to_string();
            let detail = if msg.starts_with("unknown variant") {
                format!("unknown layer kind `{kind}`; expected one of {KINDS}")
            } else {
                format!("{kind}: {msg}")
            };
            let field = msg
                .strip_prefix("unknown field `")
                .or_else(|| msg.strip_prefix("missing field `"))
                .and_then(|r| r.split('`').next());
            let pointer = match (detail.starts_with("unknown layer kind"), field) {
                (true, _) => format!("{at}/kind"),
                (false, Some(f)) => format!("{at}/{f}"),
                (false, None) => at.to_owned(),
            };
            errors.push(GraphError::new(pointer, detail));
            None
        }
    }
}

struct Validator<'a> {
    tensors: &'a TensorTable,
    used: BTreeSet<String>,
    /// Parametrized layer name -> the pointer of its first use.
    names: BTreeMap<String, String>,
    layers: Vec<LayerShape>,
    errors: Vec<GraphError>,
}

fn shape_str(s: &[usize]) -> String {
    format!("{s:?}")
}

/// `floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1` (PyTorch's Conv2d and
/// MaxPool2d output size), or `None` when the window does not fit.
pub fn window_out(size: usize, kernel: usize, stride: usize, padding: usize, dilation: usize) -> Option<usize> {
    let span = dilation.checked_mul(kernel.checked_sub(1)?)?.checked_add(1)?;
    size.checked_add(padding.checked_mul(2)?)?.checked_sub(span).map(|d| d / stride.max(1) + 1)
}

impl Validator<'_> {
    fn chain(&mut self, layers: &[Layer], at: &str, mut shape: Vec<usize>) -> Option<Vec<usize>> {
        for (i, layer) in layers.iter().enumerate() {
            let p = format!("{at}/layers/{i}");
            shape = self.layer(layer, &p, shape)?;
        }
        Some(shape)
    }

    /// The tensor `{name}.{suffix}`, required or optional; records it as used.
    fn tensor(&mut self, at: &str, name: &str, suffix: &str, required: bool) -> Option<Option<Vec<usize>>> {
        let full = format!("{name}.{suffix}");
        match self.tensors.get(&full) {
            Some((_, shape)) if shape.contains(&0) => {
                self.errors.push(GraphError::new(
                    at,
                    format!("tensor `{full}` has shape {shape:?}: a layer cannot have a dimension of 0"),
                ));
                None
            }
            Some((dtype, shape)) if dtype.is_float() => {
                self.used.insert(full);
                Some(Some(shape.clone()))
            }
            Some((dtype, _)) => {
                self.errors
                    .push(GraphError::new(at, format!("tensor `{full}` is {}, not floating point", dtype.as_str())));
                None
            }
            None if required => {
                self.errors.push(GraphError::new(at, format!("the model has no tensor `{full}`")));
                None
            }
            None => Some(None),
        }
    }

    fn fail(&mut self, at: &str, detail: String) -> Option<Vec<usize>> {
        self.errors.push(GraphError::new(at, detail));
        None
    }

    /// Checks an optional per-unit vector (`bias`, norm statistics) is `[n]`.
    fn vector(&mut self, at: &str, name: &str, suffix: &str, n: usize, required: bool) -> Option<u64> {
        match self.tensor(at, name, suffix, required)? {
            Some(s) if s == [n] => Some(n as u64),
            Some(s) => {
                self.fail(at, format!("`{name}.{suffix}` has shape {}, expected [{n}]", shape_str(&s)));
                None
            }
            None => Some(0),
        }
    }

    fn layer(&mut self, layer: &Layer, at: &str, s: Vec<usize>) -> Option<Vec<usize>> {
        if let Some(name) = layer.name() {
            if let Some(first) = self.names.insert(name.to_owned(), at.to_owned()) {
                return self.fail(at, format!("layer name `{name}` is already used at {first}; each parametrized layer needs weights of its own"));
            }
        }
        let mut params = 0u64;
        let out = match layer {
            Layer::Linear { name } => {
                let w = self.tensor(at, name, "weight", true)??;
                let [out, inp] = w[..] else {
                    return self.fail(
                        at,
                        format!("`{name}.weight` has shape {}, a linear weight is [out, in]", shape_str(&w)),
                    );
                };
                if s.last() != Some(&inp) {
                    return self.fail(at, format!("its input has shape {} but `{name}.weight` {} expects {inp} features in the last dimension", shape_str(&s), shape_str(&w)));
                }
                params += (out * inp) as u64 + self.vector(at, name, "bias", out, false)?;
                let mut o = s.clone();
                *o.last_mut().expect("non-empty") = out;
                o
            }
            Layer::Conv2d { name, stride, padding, dilation, groups } => {
                let w = self.tensor(at, name, "weight", true)??;
                let [oc, icg, kh, kw] = w[..] else {
                    return self.fail(
                        at,
                        format!(
                            "`{name}.weight` has shape {}, a conv2d weight is [out, in / groups, kh, kw]",
                            shape_str(&w)
                        ),
                    );
                };
                let [c, h, wd] = s[..] else {
                    return self
                        .fail(at, format!("a conv2d needs a [channels, height, width] input, got {}", shape_str(&s)));
                };
                if c % groups != 0 || oc % groups != 0 {
                    return self.fail(
                        at,
                        format!("groups {groups} must divide the input channels {c} and the output channels {oc}"),
                    );
                }
                if icg != c / groups {
                    return self.fail(at, format!("its input has {c} channels; with groups {groups}, `{name}.weight` {} expects {} per group, not {icg}", shape_str(&w), c / groups));
                }
                let (Some(oh), Some(ow)) =
                    (window_out(h, kh, *stride, *padding, *dilation), window_out(wd, kw, *stride, *padding, *dilation))
                else {
                    return self.fail(at, format!("the {kh}x{kw} kernel (dilation {dilation}, padding {padding}) does not fit the {h}x{wd} input"));
                };
                params += w.iter().product::<usize>() as u64 + self.vector(at, name, "bias", oc, false)?;
                vec![oc, oh, ow]
            }
            Layer::BatchNorm { name, .. } => {
                let Some(&c) = s.first() else {
                    return self.fail(at, "batch norm needs an input with a channel dimension".into());
                };
                for (suffix, required) in
                    [("running_mean", true), ("running_var", true), ("weight", false), ("bias", false)]
                {
                    params += self.vector(at, name, suffix, c, required)?;
                }
                if self.tensors.contains_key(&format!("{name}.num_batches_tracked")) {
                    self.used.insert(format!("{name}.num_batches_tracked"));
                }
                s.clone()
            }
            Layer::LayerNorm { name, .. } => {
                let d = *s.last().expect("shapes are never empty");
                params += self.vector(at, name, "weight", d, false)? + self.vector(at, name, "bias", d, false)?;
                s.clone()
            }
            Layer::Embedding { name } => {
                let w = self.tensor(at, name, "weight", true)??;
                let [v, d] = w[..] else {
                    return self.fail(
                        at,
                        format!("`{name}.weight` has shape {}, an embedding table is [vocab, dim]", shape_str(&w)),
                    );
                };
                if s.len() != 1 {
                    return self.fail(at, format!("an embedding reads token ids of shape [T], got {}", shape_str(&s)));
                }
                params += (v * d) as u64;
                vec![s[0], d]
            }
            Layer::Relu
            | Layer::Gelu
            | Layer::Silu
            | Layer::Tanh
            | Layer::Sigmoid
            | Layer::Softmax
            | Layer::Dropout { .. } => s.clone(),
            Layer::MaxPool2d { kernel, stride } | Layer::AvgPool2d { kernel, stride } => {
                let [c, h, w] = s[..] else {
                    return self
                        .fail(at, format!("pooling needs a [channels, height, width] input, got {}", shape_str(&s)));
                };
                let st = stride.unwrap_or(*kernel);
                let (Some(oh), Some(ow)) = (window_out(h, *kernel, st, 0, 1), window_out(w, *kernel, st, 0, 1)) else {
                    return self.fail(at, format!("the {kernel}x{kernel} window does not fit the {h}x{w} input"));
                };
                vec![c, oh, ow]
            }
            Layer::GlobalAvgPool2d => {
                let [c, _, _] = s[..] else {
                    return self.fail(
                        at,
                        format!(
                            "global average pooling needs a [channels, height, width] input, got {}",
                            shape_str(&s)
                        ),
                    );
                };
                vec![c]
            }
            Layer::Flatten => vec![s.iter().product()],
            Layer::Residual { layers } if layers.is_empty() => {
                return self.fail(at, "a residual block needs at least one layer (an empty one computes 2x)".into());
            }
            Layer::Residual { layers } => {
                let index = self.layers.len();
                let inner = self.chain(layers, at, s.clone())?;
                if inner != s {
                    return self.fail(at, format!("its layers change the shape from {} to {}; a residual block adds its input back, so they must keep it", shape_str(&s), shape_str(&inner)));
                }
                // The block's own entry goes before its layers, in execution order; its layers
                // carry the parameters.
                let entry = LayerShape {
                    pointer: at.into(),
                    kind: "residual",
                    name: None,
                    shape_in: s,
                    shape_out: inner.clone(),
                    parameters: 0,
                };
                self.layers.insert(index, entry);
                return Some(inner);
            }
        };
        self.layers.push(LayerShape {
            pointer: at.into(),
            kind: layer.kind(),
            name: layer.name().map(str::to_owned),
            shape_in: s,
            shape_out: out.clone(),
            parameters: params,
        });
        Some(out)
    }
}

#[cfg(test)]
mod tests;
