//! Plans: what a spec will do to each tensor, decided from the header alone.
//!
//! [`prepare`] is the one way to a plan: the server's edge (to refuse early), its worker, the CLI
//! and the benchmarks all call it, and the engine executes exactly the plan (which owns the spec
//! and the header). `POST /v1/jobs` refuses a spec whose plan has refusals, with the plan's words,
//! so a shape problem is found before any work starts.

use serde::Serialize;

pub(crate) mod planner;
mod predict;

use super::ops::structural::ShapeModel;
use super::ops::OpKind;
use super::prune::Norm;
use super::quant::{Granularity, IntParams};
use super::spec::{CompressSpec, OutputFormat};
use crate::compress::engine::text_eval::{self, TextEvalPlan, TextModel};
use crate::formats::gguf::llama_cpp::{Conversion, LlamaCppModel};
use crate::formats::gguf::GgufType;
use crate::formats::hf::ModelFiles;
use crate::formats::safetensors::{Header, TensorInfo};
use crate::graph::eval::{plan_dataset, DatasetPlan};
use crate::graph::{Graph, GraphSummary};

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Every output tensor, in the order the engine processes them.
    pub tensors: Vec<TensorPlan>,
    /// Non-empty means the spec cannot run on this model; each says where and why.
    pub refusals: Vec<Refusal>,
    pub outputs: Vec<OutputPlan>,
    pub totals: PlanTotals,
    /// Predicted peak working memory of the engine, in bytes (one tensor at a time).
    pub peak_memory_bytes: u64,
    /// Extra full reads of the targeted tensors before the main pass (global pruning, mixed
    /// precision measurement).
    pub prepasses: usize,
    /// The spec this plan carries out.
    #[serde(skip)]
    pub spec: CompressSpec,
    /// The input model's header: where each tensor is read from.
    #[serde(skip)]
    pub header: Header,
    /// With a graph attached: every layer's shapes, parameters, unused tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph: Option<GraphSummary>,
    /// With `evaluate`: which dataset tensors, how many samples, in which batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationPlan>,
    /// The graph itself, for the forward passes.
    #[serde(skip)]
    pub graph_def: Option<Graph>,
    /// The job's dataset, checked against the graph (evaluation, proofs, layer ranking).
    #[serde(skip)]
    pub dataset: Option<DatasetPlan>,
    /// What each structural step will do.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub structure: Vec<StructurePlan>,
    /// Tensors the structural steps remove (dropped layers, factorized weights).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<DroppedTensor>,
    /// The graph after the structural steps, on the new shapes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_after: Option<GraphSummary>,
    /// A teacher that is another model (`student_model_id` over HTTP, `--teacher` in the CLI):
    /// what it computes. Without one, `distill` learns from the model as it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<GraphSummary>,
    #[serde(skip)]
    pub teacher_model: Option<Teacher>,
    /// With a GGUF output of a model llama.cpp can run: its architecture, tokenizer and names.
    #[serde(skip)]
    pub llama_cpp: Option<LlamaCppModel>,
    /// The model folder's companion files, copied into the folder outputs.
    #[serde(skip)]
    pub files: ModelFiles,
    /// With `evaluate` on a language model (a folder of a covered architecture, no graph): the
    /// original and the compressed artifact run on the dataset's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_evaluation: Option<TextEvalPlan>,
}

impl Plan {
    /// Refuses the plan when its predicted peak memory is above `limit` bytes (the server's
    /// `queue.max_job_memory_bytes`), pointing at what drives it.
    pub fn refuse_above_memory(&mut self, limit: u64) {
        if self.peak_memory_bytes <= limit {
            return;
        }
        let distill = self.spec.steps.iter().position(|s| matches!(s, super::ops::Step::Distill(_)));
        let (pointer, hint) = match distill {
            Some(i) => (format!("/steps/{i}/batch_size"), "a smaller `batch_size` holds fewer activations"),
            None => (String::new(), "the largest tensor and the structural steps drive it"),
        };
        let size = |b: u64| match b {
            b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
            b => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        };
        self.refusals.push(Refusal {
            pointer,
            tensor: None,
            detail: format!(
                "the job would need about {} of memory at its peak, above this server's limit of {} (queue.max_job_memory_bytes); {hint}",
                size(self.peak_memory_bytes),
                size(limit)
            ),
        });
    }
}

/// What a plan is made from, besides the spec: the model's header and graph, the job's dataset,
/// a separate evaluation dataset and a separate distillation teacher.
pub struct PlanInputs<'a> {
    pub header: Header,
    pub graph: Option<Graph>,
    /// The job's dataset (`dataset_id`): training, proofs, ranking, and the evaluation unless
    /// it has its own.
    pub dataset: Option<&'a Header>,
    /// `evaluate.dataset_id` (CLI `--eval-dataset`): the evaluation runs on it instead.
    pub eval_dataset: Option<&'a Header>,
    pub teacher: Option<Teacher>,
    /// The model's companion files (`config.json`, tokenizer): with them a GGUF output is
    /// one llama.cpp runs, for the architectures [`crate::formats::gguf::llama_cpp`] covers.
    pub files: Option<&'a ModelFiles>,
}

impl PlanInputs<'_> {
    /// A model alone: no graph, no dataset, no teacher.
    pub fn model(header: Header) -> PlanInputs<'static> {
        PlanInputs { header, graph: None, dataset: None, eval_dataset: None, teacher: None, files: None }
    }
}

/// The files a plan is made from on the server (blobs on the local disk): headers are read with
/// `storage.max_header_bytes`.
pub struct PlanFiles<'a> {
    pub model: &'a std::path::Path,
    pub graph: Option<Graph>,
    pub dataset: Option<&'a std::path::Path>,
    pub eval_dataset: Option<&'a std::path::Path>,
    /// A separate distillation teacher: its graph and file.
    pub teacher: Option<(Graph, &'a std::path::Path)>,
    pub files: Option<&'a ModelFiles>,
}

/// Reads the headers `f` names and [`prepare`]s the plan, refused above `memory_limit` bytes
/// ([`Plan::refuse_above_memory`]): what `POST /v1/plans`, job submission and the worker share.
pub fn prepare_from_files(
    spec: CompressSpec,
    f: PlanFiles<'_>,
    header_limit: u64,
    memory_limit: u64,
) -> Result<Plan, crate::formats::safetensors::ReadError> {
    use crate::formats::safetensors::read_header;
    let read = |p: &std::path::Path| read_header(p, header_limit);
    let header = read(f.model)?;
    let dataset = f.dataset.map(read).transpose()?;
    let eval_dataset = f.eval_dataset.map(read).transpose()?;
    let teacher = match f.teacher {
        Some((graph, path)) => Some(Teacher { graph, header: read(path)? }),
        None => None,
    };
    let inputs = PlanInputs {
        header,
        graph: f.graph,
        dataset: dataset.as_ref(),
        eval_dataset: eval_dataset.as_ref(),
        teacher,
        files: f.files,
    };
    let mut plan = prepare(spec, inputs);
    plan.refuse_above_memory(memory_limit);
    Ok(plan)
}

/// A distillation teacher that is another model than the one the job compresses.
#[derive(Debug, Clone)]
pub struct Teacher {
    pub graph: Graph,
    pub header: Header,
}

/// A structural step's decisions, known before it runs.
#[derive(Debug, Clone, Serialize)]
pub struct StructurePlan {
    pub step: usize,
    pub op: OpKind,
    pub notes: Vec<String>,
    /// Parameters of the model's tensors after the step.
    pub parameters_after: u64,
}

/// A tensor that is not in the outputs.
#[derive(Debug, Clone, Serialize)]
pub struct DroppedTensor {
    pub name: String,
    pub step: usize,
    pub reason: String,
}

/// What an evaluation will read.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluationPlan {
    pub inputs: String,
    pub labels: Option<String>,
    pub samples: usize,
    pub batch_size: usize,
    /// Whether it reads a dataset of its own (`evaluate.dataset_id`) rather than the job's.
    pub separate_dataset: bool,
    #[serde(skip)]
    pub dataset: DatasetPlan,
}

impl EvaluationPlan {
    fn new(options: &crate::graph::eval::EvalOptions, d: DatasetPlan, separate_dataset: bool) -> EvaluationPlan {
        EvaluationPlan {
            inputs: d.inputs.name.clone(),
            labels: d.labels.as_ref().map(|l| l.name.clone()),
            samples: d.samples,
            batch_size: options.batch_size,
            separate_dataset,
            dataset: d,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorPlan {
    pub name: String,
    pub dtype: String,
    /// Shape of the input tensor.
    pub shape: Vec<usize>,
    /// Shape it is written with.
    pub shape_out: Vec<usize>,
    pub bytes_in: u64,
    /// Steps that change this tensor, in order.
    pub actions: Vec<PlannedAction>,
    /// Steps that could have touched it but will not, and why.
    pub skipped: Vec<Skip>,
    /// Predicted bits per weight of its compressed representation.
    pub bits_per_weight: f64,
    /// Predicted bytes of that representation (codes and scales; kept values and bitmask).
    pub bytes_out: u64,
    /// Predicted fraction of zeros after the steps.
    pub sparsity: f64,
    /// How the steps see a changed tensor: `[rows, row length]`, rows running along the last
    /// dimension (a per-channel scale and a structured-pruning unit is one row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matrix: Option<[usize; 2]>,
    /// With a `gguf` output: the type the tensor is stored as (`auto` when mixed precision
    /// decides at run time, `omitted` when GGUF cannot hold it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf_type: Option<String>,
    /// What an output layout does differently with this tensor than its scheme suggests.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Index of the input tensor it is read from (`header.tensors`).
    #[serde(skip)]
    pub(crate) index: usize,
    /// What the outputs store: name, dtype and shape (offsets are those of the input). Every
    /// step, sink, prediction and the report read this, never the input's descriptor.
    #[serde(skip)]
    pub out: TensorInfo,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedAction {
    pub step: usize,
    pub op: OpKind,
    /// e.g. `int4/group128/sym`, `q4_k`, `f16 (fallback)`, `magnitude/layer/0.50`, `2:4`.
    pub scheme: String,
    /// Why this scheme and not the one asked for (fallbacks), or what is decided at run time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip)]
    pub kernel: Kernel,
}

impl PlannedAction {
    /// Whether the action zeroes weights in place (pruning without a graph), which the sparse
    /// layout stores as a bitmask; a structural rewrite removes them instead.
    pub fn zeroes(&self) -> bool {
        self.op == OpKind::Prune && !matches!(self.kernel, Kernel::Rewritten { .. })
    }
}

/// The typed instruction the engine runs for one tensor and one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Kernel {
    Int(IntParams),
    Ggml(GgufType),
    /// Mixed precision: the scheme is chosen by the engine's measurement pass.
    Auto {
        step: usize,
    },
    Magnitude {
        sparsity: f64,
    },
    /// One threshold over every tensor of the step, found by the engine's selection passes.
    GlobalMagnitude {
        step: usize,
    },
    NM {
        n: usize,
        m: usize,
    },
    Structured {
        norm: Norm,
        amount: f64,
    },
    /// Zero the bias entries of rows a structured step removes from `weight`.
    BiasOf {
        weight: String,
        step: usize,
    },
    /// Values come from the structural steps' rewrite of the model (new shape or new tensor).
    Rewritten {
        step: usize,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    pub step: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    /// JSON pointer of the step field that cannot apply.
    pub pointer: String,
    pub tensor: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputPlan {
    pub format: &'static str,
    /// The output's main file: for a sharded output, its `model.safetensors.index.json`.
    pub artifact: String,
    pub predicted_bytes: u64,
    /// Files the weights are split into (`max_shard_size`); exact for `safetensors`, predicted
    /// for `compressed-tensors`.
    #[serde(skip_serializing_if = "is_one")]
    pub shards: usize,
    /// What the artifact is not, when a user would expect it to be (a GGUF that llama.cpp
    /// cannot run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Said of a GGUF output for a model without a `config.json` of an architecture
/// [`crate::formats::gguf::llama_cpp`] covers.
pub const GENERIC_GGUF_NOTE: &str = "a generic GGUF: the tensors under their own names with ModelPress metadata, readable by the gguf package and candle, without general.architecture, hyperparameters, tokenizer or llama.cpp tensor names, so llama.cpp refuses to run it";

/// The text evaluation of a language model on dataset `d`: its text tensor, the budget, and the
/// artifact that stands for the compressed model (the llama.cpp GGUF when written, else the
/// dense safetensors).
fn plan_text_evaluation(
    spec: &CompressSpec,
    files: &ModelFiles,
    (d, separate_dataset): (&Header, bool),
    runnable_gguf: bool,
    reshaped: bool,
    model: TextModel,
    dense_artifact: String,
) -> Result<TextEvalPlan, String> {
    let options = spec.evaluate.clone().unwrap_or_default();
    let name = options.text.clone().unwrap_or_else(|| "text".into());
    let t = d.get(&name).ok_or_else(|| {
        format!("the dataset has no `{name}` tensor: upload the text as text/plain to /v1/datasets (it becomes a U8 `text` tensor), or name the tensor in `evaluate.text`")
    })?;
    if t.dtype != crate::formats::safetensors::Dtype::U8 || t.shape.len() != 1 {
        return Err(format!("`{name}` must be a 1-D U8 tensor of UTF-8 text, got {} {:?}", t.dtype.as_str(), t.shape));
    }
    if reshaped {
        return Err("a structural step changed the model's shapes, so its config.json no longer describes the output; evaluate in a job of its own on the registered model".into());
    }
    let context = options.context.unwrap_or(text_eval::DEFAULT_CONTEXT);
    if model == TextModel::Encoder {
        crate::compress::engine::embed_eval::check(files, context)?;
        if !spec.outputs.contains(&OutputFormat::Safetensors) {
            return Err("evaluating an encoder runs the dense `safetensors` output (it holds exactly the values every other layout decodes to): add it to `outputs`".into());
        }
        return Ok(TextEvalPlan {
            text: name,
            text_bytes: t.bytes(),
            tokens: options.tokens.unwrap_or(crate::compress::engine::embed_eval::DEFAULT_TOKENS),
            context,
            artifact: dense_artifact,
            separate_dataset,
            model,
        });
    }
    let llama3_rope = text_eval::check(files, context)?;
    let artifact = if runnable_gguf && !llama3_rope && spec.outputs.contains(&OutputFormat::Gguf) {
        "model.gguf".to_owned()
    } else if spec.outputs.contains(&OutputFormat::Safetensors) {
        dense_artifact
    } else {
        return Err(if llama3_rope {
            "the model uses llama3 RoPE scaling, which candle's GGUF reader does not apply: add a `safetensors` output for the evaluation to run".into()
        } else {
            "evaluating a language model runs a `gguf` (llama.cpp's kind) or `safetensors` output: add one to `outputs`"
                .into()
        });
    };
    Ok(TextEvalPlan {
        text: name,
        text_bytes: t.bytes(),
        tokens: options.tokens.unwrap_or(text_eval::DEFAULT_TOKENS),
        context,
        artifact,
        separate_dataset,
        model,
    })
}

/// The llama.cpp form of a GGUF output, when the model's files describe an architecture
/// that is covered (else the generic GGUF and why); a covered architecture that cannot be
/// converted is a refusal at the output.
fn plan_llama_cpp(
    spec: &CompressSpec,
    files: Option<&ModelFiles>,
    tensors: &[TensorPlan],
    refusals: &mut Vec<Refusal>,
) -> Option<Conversion> {
    let i = spec.outputs.iter().position(|f| *f == OutputFormat::Gguf)?;
    let shapes: Vec<(&str, &[usize])> =
        tensors.iter().map(|tp| (tp.out.name.as_str(), tp.out.shape.as_slice())).collect();
    let Some(files) = files else {
        return Some(Conversion::Generic(
            "the model was given as one file, without its config.json and tokenizer".into(),
        ));
    };
    match crate::formats::gguf::llama_cpp::plan(files, &shapes) {
        Ok(c) => Some(c),
        Err(detail) => {
            refusals.push(Refusal {
                pointer: format!("/outputs/{i}"),
                tensor: None,
                detail: format!("a GGUF for llama.cpp cannot be written: {detail}"),
            });
            None
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanTotals {
    pub tensors: usize,
    pub tensors_changed: usize,
    pub parameters: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Average over all parameters of the compressed representation.
    pub bits_per_weight: f64,
}

/// Working memory per element of the largest tensor: original and working f32, scratch f32,
/// codes, the encoded outputs, and the dense encoding in the tensor's dtype (up to f32). The
/// layout check after the main pass runs after those buffers are freed and needs fewer.
const BYTES_PER_ELEMENT_IN_FLIGHT: u64 = 4 * 3 + 1 + 4 + 2 + 4;
/// Fixed overhead of the process (runtime, buffers, SQLite) included in the prediction.
const BASE_MEMORY_BYTES: u64 = 64 << 20;

/// Plans `spec` on the model whose header is `header`, with the model's architecture `graph`
/// and the header of the job's `dataset` when there are: the only way to a [`Plan`], which owns
/// all of them and is all [`crate::compress::engine::execute`] reads.
pub fn prepare(spec: CompressSpec, inputs: PlanInputs<'_>) -> Plan {
    let PlanInputs { header, graph, dataset: dataset_header, eval_dataset, teacher, files } = inputs;
    let tensors = header
        .tensors
        .iter()
        .enumerate()
        .map(|(index, t)| TensorPlan {
            name: t.name.clone(),
            dtype: t.dtype.as_str().to_owned(),
            shape: t.shape.clone(),
            shape_out: t.shape.clone(),
            bytes_in: t.bytes(),
            actions: Vec::new(),
            skipped: Vec::new(),
            bits_per_weight: (t.dtype.size() * 8) as f64,
            bytes_out: t.bytes(),
            sparsity: 0.0,
            matrix: None,
            gguf_type: None,
            notes: Vec::new(),
            index,
            out: t.clone(),
        })
        .collect();
    let mut refusals = Vec::new();
    let table = crate::graph::tensor_table(&header);
    let graph_summary = graph.as_ref().and_then(|g| match g.validate(&table) {
        Ok(s) => Some(s),
        Err(errors) => {
            refusals.extend(errors.into_iter().map(|e| Refusal {
                pointer: format!("/graph{}", e.pointer),
                tensor: None,
                detail: format!("the model's graph does not fit it: {}", e.detail),
            }));
            None
        }
    });
    // A language model (a folder llama.cpp's converter covers, no graph) is evaluated on text by
    // its own tokenizer, not through a graph: planned once the outputs are known.
    let text_model = files.and_then(text_eval::covers).filter(|_| spec.evaluate.is_some() && graph.is_none());
    let text_mode = text_model.is_some();
    let graph_spec = if text_mode { CompressSpec { evaluate: None, ..spec.clone() } } else { spec.clone() };
    let (dataset, evaluation) = plan_evaluation(
        &graph_spec,
        graph.as_ref(),
        graph_summary.as_ref(),
        (dataset_header, eval_dataset),
        &mut refusals,
    );
    let teacher_summary = teacher.as_ref().and_then(|t| check_teacher(&spec, t, graph_summary.as_ref(), &mut refusals));
    for (i, step) in spec.steps.iter().enumerate() {
        let names_student = matches!(step, super::ops::Step::Distill(d) if d.student_model_id.is_some());
        if names_student && i > 0 {
            refusals.push(Refusal {
                pointer: format!("/steps/{i}/student_model_id"),
                tensor: None,
                detail: "`student_model_id` replaces the model the whole job works on, so only the first step may name it; chain jobs with `register: true` to distill again".into(),
            });
        }
    }
    if let (Some((i, _)), None) = (spec.student_model_id(), &teacher) {
        refusals.push(Refusal {
            pointer: format!("/steps/{i}/student_model_id"),
            tensor: None,
            detail: "`student_model_id` names an uploaded model, which the server resolves; in the CLI, compress the student and give the teacher with --teacher FILE --teacher-graph FILE".into(),
        });
    }
    let shapes = ShapeModel { graph: graph_summary.as_ref().and(graph.clone()), table };
    let mut planner = planner::Planner {
        refusals,
        shapes,
        has_dataset: dataset.is_some(),
        has_labels: dataset.as_ref().is_some_and(|d| d.labels.is_some()),
        teacher: teacher_summary.clone().or(graph_summary.clone()),
        ..planner::Planner::new(&spec, tensors)
    };
    for (i, step) in spec.steps.iter().enumerate() {
        planner.step(i, step.op());
    }
    for (i, step) in spec.steps.iter().enumerate() {
        step.op().check(&mut planner, i);
    }
    let planner::Planner { mut tensors, mut refusals, shapes, structure, dropped, .. } = planner;
    let graph_after = match (&shapes.graph, structure.is_empty()) {
        (Some(g), false) => g.validate(&shapes.table).ok(),
        _ => None,
    };
    describe_layouts(&spec, &mut tensors);
    predict::check_output_names(&spec, &tensors, &mut refusals);
    let conversion = plan_llama_cpp(&spec, files, &tensors, &mut refusals);
    let text_evaluation = match (text_mode, eval_dataset.map(|d| (d, true)).or(dataset_header.map(|d| (d, false)))) {
        (false, _) => None,
        (true, None) => {
            refusals.push(Refusal {
                pointer: "/evaluate".into(),
                tensor: None,
                detail: "evaluating a language model needs a text dataset: give `dataset_id` or `evaluate.dataset_id` (a text/plain upload to /v1/datasets; CLI: --dataset FILE.txt)".into(),
            });
            None
        }
        (true, Some((d, separate))) => {
            let runnable = matches!(&conversion, Some(Conversion::Runnable(_)));
            let files = files.expect("text mode needs the model's files");
            match plan_text_evaluation(
                &spec,
                files,
                (d, separate),
                runnable,
                !structure.is_empty() || !dropped.is_empty(),
                text_model.expect("text mode"),
                // The dense output may be sharded: the evaluation then opens its index (tensors
                // are in index order here, as written: no structural step precedes an evaluation).
                artifact_name(
                    OutputFormat::Safetensors,
                    predict::shard_count(OutputFormat::Safetensors, &tensors, spec.max_shard_bytes),
                ),
            ) {
                Ok(p) => Some(p),
                Err(detail) => {
                    refusals.push(Refusal { pointer: "/evaluate".into(), tensor: None, detail });
                    None
                }
            }
        }
    };
    let (llama_cpp, generic_reason) = match conversion {
        Some(Conversion::Runnable(m)) => (Some(m), None),
        Some(Conversion::Generic(why)) => (None, Some(why)),
        None => (None, None),
    };
    if let (Some(i), None) = (spec.outputs.iter().position(|f| *f == OutputFormat::Gguf), &llama_cpp) {
        for t in tensors
            .iter()
            .map(|tp| &tp.out)
            .filter(|t| t.dtype.is_float() && t.name.len() > crate::formats::gguf::MAX_NAME_BYTES)
        {
            refusals.push(Refusal {
                pointer: format!("/outputs/{i}"),
                tensor: Some(t.name.clone()),
                detail: format!(
                    "tensor `{}`: its name is {} bytes; GGUF readers (llama.cpp) accept at most {}",
                    t.name,
                    t.name.len(),
                    crate::formats::gguf::MAX_NAME_BYTES
                ),
            });
        }
    }

    // Biases that follow a structurally pruned weight are processed after every other tensor,
    // so the rows removed from their weight are known when they are written.
    tensors.sort_by_key(|t| (t.actions.iter().any(|a| matches!(a.kernel, Kernel::BiasOf { .. })), t.index));

    let parameters: u64 = tensors.iter().map(|tp| tp.out.numel() as u64).sum();
    // Every input byte, dropped and factorized tensors included.
    let bytes_in: u64 = header.tensors.iter().map(|t| t.bytes()).sum();
    let bytes_out: u64 = tensors.iter().map(|t| t.bytes_out).sum();
    let outputs = spec
        .outputs
        .iter()
        .map(|f| {
            let shards = predict::shard_count(*f, &tensors, spec.max_shard_bytes);
            OutputPlan {
                format: f.as_str(),
                artifact: artifact_name(*f, shards),
                predicted_bytes: predict::output_bytes(*f, header.data_start, &tensors),
                shards,
                note: (*f == OutputFormat::Gguf).then(|| match (&llama_cpp, &generic_reason) {
                    (Some(m), _) => m.summary.clone(),
                    (None, Some(why)) => format!("{GENERIC_GGUF_NOTE}: {why}"),
                    (None, None) => GENERIC_GGUF_NOTE.to_owned(),
                }),
            }
        })
        .collect::<Vec<OutputPlan>>();
    // A folder of more shards than a folder upload takes back (or the CLI reads) is refused.
    let max_shards = crate::formats::hf::MAX_SHARDS;
    if let Some(o) = outputs.iter().find(|o| o.shards > max_shards) {
        refusals.push(Refusal {
            pointer: "/max_shard_size".into(),
            tensor: None,
            detail: format!(
                "the `{}` output would be {} files of at most {} bytes; at most {max_shards} shards are written: raise max_shard_size",
                o.format, o.shards, spec.max_shard_bytes
            ),
        });
    }
    let max_numel = tensors.iter().map(|tp| tp.out.numel().max(header.tensors[tp.index].numel()) as u64).max();
    let prepasses = spec.steps.iter().map(|s| s.op().prepasses()).sum();
    let eval_bytes = evaluation
        .as_ref()
        .map_or(0, |e| eval_memory(e, graph_summary.as_ref(), teacher_summary.as_ref().or(graph_summary.as_ref())));
    // Structural steps hold the model's (graph's) tensors in f32, a reference copy for the proof
    // and the edited copy: three times its parameters. Distillation adds the teacher (the
    // original or a separate model), the gradients and AdamW's two moments (three more copies)
    // and a batch's activations, kept for the backward pass (four per layer output).
    let model_bytes = 4 * header.tensors.iter().filter(|t| t.dtype.is_float()).map(|t| t.numel() as u64).sum::<u64>();
    let distill_batch = spec.steps.iter().find_map(|s| match s {
        super::ops::Step::Distill(d) => Some(d.config.batch_size as u64),
        _ => None,
    });
    let widest = graph_summary
        .as_ref()
        .and_then(|g| g.layers.iter().map(|l| l.shape_out.iter().product::<usize>() as u64).max())
        .unwrap_or(0);
    // The teacher: a copy of the model, or a separate model's graph tensors.
    let teacher_bytes = teacher.as_ref().map_or(model_bytes, |t| {
        let names = t.graph.tensor_names();
        4 * t.header.tensors.iter().filter(|x| names.contains(&x.name)).map(|x| x.numel() as u64).sum::<u64>()
    });
    let structural_bytes = match (structure.is_empty(), distill_batch) {
        (true, _) => 0,
        (false, None) => 3 * model_bytes,
        (false, Some(batch)) => {
            // A batch is at most the dataset; the dataset's inputs and the teacher's logits
            // stay in memory for every epoch.
            let (samples, inputs) =
                dataset.as_ref().map_or((batch, 0), |d| (d.samples as u64, d.inputs.numel() as u64));
            let classes = graph_summary.as_ref().map_or(0, |g| g.output_shape.iter().product::<usize>() as u64);
            // The teacher's outputs of every feature pair's layer, for every sample.
            let feature_width: u64 = spec
                .steps
                .iter()
                .filter_map(|s| match s {
                    super::ops::Step::Distill(d) => Some(&d.config.features),
                    _ => None,
                })
                .flatten()
                .filter_map(|(t, _)| teacher_summary.as_ref().or(graph_summary.as_ref())?.layer(t))
                .map(|l| l.shape_out.iter().product::<usize>() as u64)
                .sum();
            6 * model_bytes
                + teacher_bytes
                + 4 * (inputs + samples * (classes + feature_width))
                + 4 * 4 * batch.min(samples) * widest * graph_summary.as_ref().map_or(1, |g| g.layers.len() as u64)
        }
    };
    Plan {
        totals: PlanTotals {
            tensors: tensors.len(),
            tensors_changed: tensors.iter().filter(|t| !t.actions.is_empty()).count(),
            parameters,
            bytes_in,
            bytes_out,
            bits_per_weight: if parameters > 0 { bytes_out as f64 * 8.0 / parameters as f64 } else { 0.0 },
        },
        tensors,
        refusals,
        outputs,
        peak_memory_bytes: BASE_MEMORY_BYTES
            + max_numel.unwrap_or(0) * BYTES_PER_ELEMENT_IN_FLIGHT
            + eval_bytes
            + structural_bytes
            // A text evaluation holds the original in f32 (the file read whole, then its tensors)
            // and the compressed model: about three f32 copies of the parameters.
            + text_evaluation.as_ref().map_or(0, |_| 3 * model_bytes),
        prepasses,
        spec,
        header,
        graph: graph_summary,
        evaluation,
        graph_def: graph,
        dataset,
        structure,
        dropped,
        graph_after,
        teacher: teacher_summary,
        teacher_model: teacher,
        llama_cpp,
        files: files.cloned().unwrap_or_default(),
        text_evaluation,
    }
}

/// A separate teacher must fit its own graph, feed on the same inputs and give the same number
/// of logits as the student, and some `distill` step must learn from it.
fn check_teacher(
    spec: &CompressSpec,
    teacher: &Teacher,
    student: Option<&GraphSummary>,
    refusals: &mut Vec<Refusal>,
) -> Option<GraphSummary> {
    let distill = spec.steps.iter().position(|s| s.kind() == OpKind::Distill);
    let Some(step) = distill else {
        refusals.push(Refusal {
            pointer: "/steps".into(),
            tensor: None,
            detail: "a teacher model was given, but no `distill` step learns from it".into(),
        });
        return None;
    };
    let pointer = match spec.student_model_id() {
        Some((i, _)) => format!("/steps/{i}/student_model_id"),
        None => format!("/steps/{step}"),
    };
    let summary = match teacher.graph.validate(&crate::graph::tensor_table(&teacher.header)) {
        Ok(s) => s,
        Err(errors) => {
            refusals.push(Refusal {
                pointer: "/model_id".into(),
                tensor: None,
                detail: format!("the teacher's graph does not fit it: {}", errors[0]),
            });
            return None;
        }
    };
    if let Some(s) = student {
        if s.input_shape != summary.input_shape || s.output_shape != summary.output_shape {
            refusals.push(Refusal {
                pointer,
                tensor: None,
                detail: format!(
                    "the student maps {:?} to {:?} but the teacher maps {:?} to {:?}: distillation needs the same inputs and the same logits",
                    s.input_shape, s.output_shape, summary.input_shape, summary.output_shape
                ),
            });
        }
    }
    Some(summary)
}

/// The job's dataset checked against the graph, and what `evaluate` will read; refusals say why
/// either cannot be.
fn plan_evaluation(
    spec: &CompressSpec,
    graph: Option<&Graph>,
    summary: Option<&GraphSummary>,
    (dataset, eval_dataset): (Option<&Header>, Option<&Header>),
    refusals: &mut Vec<Refusal>,
) -> (Option<DatasetPlan>, Option<EvaluationPlan>) {
    if let (Some(eval), Some(summary), Some(options)) = (eval_dataset, summary, &spec.evaluate) {
        // Two datasets: the job's for the steps, the evaluation's for the evaluation. The job's
        // is read by the tensor names a `distill` step gives, else by the evaluation's.
        let names_given = spec.steps.iter().any(|s| matches!(s, super::ops::Step::Distill(d) if d.inputs.is_some()));
        let same_names = crate::graph::eval::EvalOptions {
            inputs: options.inputs.clone(),
            labels: options.labels.clone(),
            ..Default::default()
        };
        let steps_only = CompressSpec { evaluate: (!names_given).then_some(same_names), ..spec.clone() };
        let train = match dataset {
            Some(_) => plan_evaluation(&steps_only, graph, Some(summary), (dataset, None), refusals).0,
            None => None,
        };
        return match plan_dataset(eval, options, &summary.input_shape, &summary.output_shape) {
            Ok(d) => (train, Some(EvaluationPlan::new(options, d, true))),
            Err(detail) => {
                refusals.push(Refusal { pointer: "/evaluate/dataset_id".into(), tensor: None, detail });
                (train, None)
            }
        };
    }
    let pointer = if spec.evaluate.is_some() { "/evaluate" } else { "/dataset_id" };
    let refuse = |refusals: &mut Vec<Refusal>, detail: String| {
        refusals.push(Refusal { pointer: pointer.into(), tensor: None, detail });
    };
    let (Some(summary), Some(dataset)) = (summary, dataset) else {
        if spec.evaluate.is_some() && graph.is_none() {
            refuse(refusals, "evaluation runs the model, which needs its architecture graph: attach one with PUT /v1/models/{id}/graph (CLI: --graph FILE)".into());
        }
        if spec.evaluate.is_some() && dataset.is_none() {
            refuse(refusals, "evaluation needs a dataset: give `dataset_id` (CLI: --dataset FILE)".into());
        }
        return (None, None);
    };
    // The dataset tensors: those `evaluate` names, else those a `distill` step names.
    let distill_inputs = spec.steps.iter().find_map(|s| match s {
        super::ops::Step::Distill(d) => d.inputs.clone(),
        _ => None,
    });
    let options = match (spec.evaluate.clone(), distill_inputs) {
        (Some(e), Some(i)) if e.inputs != i => {
            refuse(
                refusals,
                format!("`evaluate` reads `{}` but `distill` trains on `{i}`: name the same tensor", e.inputs),
            );
            return (None, None);
        }
        (Some(e), _) => e,
        (None, Some(i)) => crate::graph::eval::EvalOptions { inputs: i, ..Default::default() },
        (None, None) => Default::default(),
    };
    match plan_dataset(dataset, &options, &summary.input_shape, &summary.output_shape) {
        Ok(d) => {
            let evaluation = spec.evaluate.as_ref().map(|o| EvaluationPlan::new(o, d.clone(), false));
            (Some(d), evaluation)
        }
        Err(detail) => {
            refuse(refusals, detail);
            (None, None)
        }
    }
}

/// Memory an evaluation adds: the original model's weights (the teacher's when it is another
/// model) and the compressed model's in f32, the dataset's inputs in f32, and a batch's
/// activations (two layers' outputs at a time, both models).
fn eval_memory(e: &EvaluationPlan, graph: Option<&GraphSummary>, original: Option<&GraphSummary>) -> u64 {
    let (Some(g), Some(o)) = (graph, original) else { return 0 };
    let widest = |s: &GraphSummary| s.layers.iter().map(|l| l.shape_out.iter().product::<usize>()).max().unwrap_or(0);
    let widest = widest(g).max(widest(o)) as u64;
    let inputs = e.dataset.inputs.numel() as u64;
    4 * (g.parameters + o.parameters) + 4 * inputs + 4 * 4 * e.batch_size as u64 * widest
}

/// Fills what each tensor becomes in the requested layouts (plan fields `matrix`, `gguf_type`,
/// `notes`), from the same rules the sinks follow.
fn describe_layouts(spec: &CompressSpec, tensors: &mut [TensorPlan]) {
    let gguf = spec.outputs.contains(&OutputFormat::Gguf);
    let ct = spec.outputs.contains(&OutputFormat::CompressedTensors);
    for tp in tensors.iter_mut() {
        let t = &tp.out;
        let last = tp.actions.last().map(|a| &a.kernel);
        if last.is_some() {
            let (rows, cols) = t.matrix();
            tp.matrix = Some([rows, cols]);
        }
        if gguf {
            tp.gguf_type = Some(match last {
                Some(Kernel::Auto { .. }) => "auto".to_string(),
                Some(Kernel::Ggml(ty)) => ty.name().to_string(),
                _ => crate::compress::layout::gguf_type_for(t, None).map_or("omitted", |ty| ty.name()).to_string(),
            });
        }
        if ct
            && matches!(last, Some(Kernel::Int(_) | Kernel::Auto { .. }))
            && !crate::compress::layout::packs_as_linear(t)
        {
            tp.notes.push(
                "compressed-tensors stores it dense and lists it in `ignore`: its loaders decompress the weights of Linear modules only (rank 2, not embeddings)"
                    .into(),
            );
        }
        if let Some(Kernel::Int(p)) = last {
            if tp.bits_per_weight >= (t.dtype.size() * 8) as f64 && p.granularity != Granularity::Tensor {
                tp.notes.push(format!(
                    "its scales cost more than the codes save: rows of {} values (the last dimension) each get their own; consider `granularity: tensor`",
                    t.matrix().1
                ));
            }
        }
    }
}

/// The main artifact an output format produces in `shards` files.
pub fn artifact_name(f: OutputFormat, shards: usize) -> String {
    use crate::formats::safetensors::sharded::INDEX_FILE;
    match (f, shards > 1) {
        (OutputFormat::Safetensors, false) => "model.safetensors".into(),
        (OutputFormat::Safetensors, true) => INDEX_FILE.into(),
        (OutputFormat::CompressedTensors, false) => "compressed-tensors/model.safetensors".into(),
        (OutputFormat::CompressedTensors, true) => format!("compressed-tensors/{INDEX_FILE}"),
        (OutputFormat::Gguf, _) => "model.gguf".into(),
        (OutputFormat::Sparse, _) => "sparse/model.safetensors".into(),
    }
}

fn is_one(n: &usize) -> bool {
    *n == 1
}
