//! The command line: `serve`, `migrate`, `healthcheck`, `openapi`, and the one-shot `compress`
//! and `plan` that run the engine without a server.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::compress::engine::{self, Control, Inputs};
use crate::compress::plan::{prepare, PlanInputs};
use crate::compress::spec::{
    parse_compress, parse_evaluate, parse_report, parse_shard_size, work_sha256, CompressSpec,
};
use crate::config::Settings;
use crate::formats::hf::{ModelFiles, ModelFolder, Weights as HfWeights};
use crate::formats::safetensors::read_header;
use crate::graph::eval::EvalOptions;
use crate::graph::Graph;

#[derive(Debug, Parser)]
#[command(name = "modelpress", version, about = "Makes neural-network models smaller")]
pub struct Cli {
    /// Settings file layered over config/default.toml (then MODELPRESS__SECTION__KEY variables).
    #[arg(long, global = true, env = "MODELPRESS_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server and its workers.
    Serve,
    /// Create or upgrade the database, then exit.
    Migrate,
    /// Exit 0 when the server on the configured address is ready (for container health checks).
    Healthcheck,
    /// Print the OpenAPI document.
    Openapi,
    /// Compress a model file without a server, writing the artifacts to a directory.
    Compress {
        #[command(flatten)]
        job: JobArgs,
        /// Output directory (created; must be empty if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print what a spec would do to a model (reads only the headers and the graph).
    Plan {
        #[command(flatten)]
        job: JobArgs,
    },
    /// Manage API keys in the configured data directory (works with the server running or not).
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (the only time the full key is shown).
    Create {
        /// Who the key acts for.
        #[arg(long)]
        principal: String,
        /// `read`, `write` or `admin`.
        #[arg(long, default_value = "write")]
        scopes: String,
        /// A label for the key.
        #[arg(long)]
        name: Option<String>,
        /// Days until the key stops working.
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List the keys (never their secrets), as JSON.
    List,
    /// Revoke a key by its id (the 12 characters after `mp_`).
    Revoke { id: String },
}

/// A model, a spec, and optionally the model's graph and a dataset.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    /// The .safetensors model, or a Hugging Face folder (config.json, the tokenizer files, and
    /// model.safetensors or shards with model.safetensors.index.json; the index file names the
    /// folder too). The companion files go into the outputs (a llama.cpp GGUF, complete folders).
    pub model: PathBuf,
    /// A JSON spec with `steps`, optional `outputs`, `evaluate`, `max_shard_size` and `report` (as for POST /v1/jobs, without
    /// model_id).
    #[arg(long)]
    pub spec: PathBuf,
    /// The model's architecture graph (JSON), as for PUT /v1/models/{id}/graph.
    #[arg(long)]
    pub graph: Option<PathBuf>,
    /// A dataset (.safetensors with `inputs`, optional `labels`), or a .txt file of UTF-8 text
    /// for a language model's `evaluate`. With --graph and no `evaluate` in the spec, the model
    /// is evaluated before and after with the defaults.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// A dataset the evaluation runs on instead of --dataset (a test split: --dataset then
    /// trains and ranks only). Evaluates with the defaults unless the spec has `evaluate`.
    #[arg(long)]
    pub eval_dataset: Option<PathBuf>,
    /// A separate distillation teacher (.safetensors): `distill` steps train the model above
    /// (the student) to match it. Needs --teacher-graph.
    #[arg(long, requires = "teacher_graph")]
    pub teacher: Option<PathBuf>,
    /// The teacher's architecture graph (JSON).
    #[arg(long, requires = "teacher")]
    pub teacher_graph: Option<PathBuf>,
}

pub fn run(cli: Cli) -> ExitCode {
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve => {
            let settings = Settings::load(cli.config.as_deref())?;
            crate::telemetry::init(&settings.log);
            runtime()?.block_on(async {
                let app = crate::startup::Application::build(settings).await?;
                app.run_until_stopped().await
            })?;
        }
        Command::Migrate => {
            let settings = Settings::load(cli.config.as_deref())?;
            crate::telemetry::init(&settings.log);
            runtime()?.block_on(async {
                let db = open_database(&settings).await?;
                println!("database {} is migrated to the latest schema", crate::storage::db::redact(&db.url));
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Command::Healthcheck => {
            let settings = Settings::load(cli.config.as_deref())?;
            return Ok(healthcheck(&settings));
        }
        Command::Openapi => print_out(&crate::http::openapi_document())?,
        Command::Plan { mut job } => {
            let _text = wrap_text_datasets(&mut job)?;
            let limit = Settings::load(cli.config.as_deref())?.queue.job_memory_limit();
            let (plan, _) = prepare_job(&job, &Model::open(&job.model)?, limit)?;
            print_out(&serde_json::to_string_pretty(&plan)?)?;
        }
        Command::Keys { action } => {
            let settings = Settings::load(cli.config.as_deref())?;
            return runtime()?.block_on(keys(&settings, action));
        }
        Command::Compress { mut job, out } => {
            let _text = wrap_text_datasets(&mut job)?;
            let limit = Settings::load(cli.config.as_deref())?.queue.job_memory_limit();
            return compress(&job, &out, limit);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `modelpress keys ...`, straight on the database (SQLite lets the server run meanwhile).
/// The configured database, migrated; the data directory is created only for SQLite (it holds
/// the file). Errors name the URL, password masked.
async fn open_database(settings: &Settings) -> anyhow::Result<crate::storage::db::Db> {
    use anyhow::Context;
    let url = &settings.storage.database_url;
    if url.starts_with("sqlite://") {
        std::fs::create_dir_all(&settings.storage.data_dir)?;
    }
    crate::storage::db::Db::connect(url, &settings.storage.data_dir)
        .await
        .with_context(|| format!("opening the database {}", crate::storage::db::redact(url)))
}

async fn keys(settings: &Settings, action: KeysCommand) -> anyhow::Result<ExitCode> {
    use crate::storage::keys::{CreateError, KeyStore};
    let store = KeyStore::new(open_database(settings).await?);
    match action {
        KeysCommand::Create { principal, scopes, name, expires_in_days } => {
            let (scope, expires) = crate::http::auth::check_new_key(&principal, &scopes, expires_in_days)
                .map_err(|e| anyhow::anyhow!("{}", e.detail))?;
            match store.create(&principal, name.as_deref(), scope, expires).await {
                Ok((record, key)) => {
                    eprintln!(
                        "key {} for `{}` ({}); it is shown only now:",
                        record.id, record.principal, record.scopes
                    );
                    println!("{key}");
                }
                Err(CreateError::TooManyKeys(n)) => {
                    anyhow::bail!("`{principal}` already has {n} live keys (the most for rotation): revoke one first")
                }
                Err(CreateError::Database(e)) => return Err(e.into()),
            }
        }
        KeysCommand::List => {
            let views: Vec<crate::http::auth::KeyView> =
                store.list().await?.iter().map(crate::http::auth::KeyView::from).collect();
            print_out(&serde_json::to_string_pretty(&views)?)?;
        }
        KeysCommand::Revoke { id } => {
            if !store.revoke(&id).await? {
                anyhow::bail!("no key with id `{id}`");
            }
            eprintln!("key {id} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// A plain HTTP/1.0 GET of `/readyz` on the configured address: no client library needed.
fn healthcheck(settings: &Settings) -> ExitCode {
    let host = if settings.server.host == "0.0.0.0" { "127.0.0.1" } else { settings.server.host.as_str() };
    let address = format!("{host}:{}", settings.server.port);
    let check = || -> std::io::Result<bool> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&address)?.next().ok_or(std::io::ErrorKind::NotFound)?;
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("GET /readyz HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"))
    };
    match check() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("{address} is not ready");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{address}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads a CLI spec: `steps` and `outputs`; `model_id`/`dataset_id` of a job spec are ignored.
/// Prints `text` and a newline to stdout. A reader that went away (`| head`) ends the output
/// quietly, as a Unix filter does, instead of panicking like `println!`.
fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// The spec, its work hash, and whether it says `evaluate` (even `false`).
fn load_spec(path: &Path) -> anyhow::Result<(CompressSpec, String, bool)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let obj = value.as_object_mut().context("the spec must be a JSON object")?;
    obj.remove("model_id");
    obj.remove("dataset_id");
    const FIELDS: [&str; 5] = ["steps", "outputs", "evaluate", "max_shard_size", "report"];
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        anyhow::bail!("{}: unknown field `{k}` (expected one of {})", path.display(), FIELDS.join(", "));
    }
    let steps = obj.get("steps").context("missing field `steps`")?;
    let mut spec = parse_compress(steps, obj.get("outputs"))
        .map_err(|errors| anyhow::anyhow!(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")))?;
    if let Some(e) = obj.get("evaluate") {
        spec.evaluate = parse_evaluate(e).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Some(m) = obj.get("max_shard_size") {
        spec.max_shard_bytes = parse_shard_size(m).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Some(r) = obj.get("report") {
        spec.report = parse_report(r).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let work = work_sha256(steps, obj.get("outputs"), spec.max_shard_bytes);
    Ok((spec, work, obj.contains_key("evaluate")))
}

/// Reads a graph file; its errors carry the layer pointers.
fn load_graph(path: &Path) -> anyhow::Result<Graph> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    Graph::parse(&value).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| format!("{}: {e}", path.display())).collect();
        anyhow::anyhow!(lines.join("\n"))
    })
}

/// The model a CLI job reads: one file, or a folder's weights (sharded ones are merged
/// before the job runs) and its companion files.
struct Model {
    /// The safetensors file, or the folder's first shard while not merged.
    path: PathBuf,
    files: Option<ModelFiles>,
    /// Shards still to merge (see [`crate::formats::hf::merge_shards`]).
    shards: Option<Vec<(PathBuf, crate::formats::safetensors::Header)>>,
}

impl Model {
    fn open(path: &Path) -> anyhow::Result<Model> {
        let folder = match path.file_name().and_then(|n| n.to_str()) {
            _ if path.is_dir() => path,
            // `model.safetensors.index.json` given inside its folder has the empty parent.
            Some(crate::formats::hf::INDEX_FILE) => {
                path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
            }
            _ => {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if let Some((k, n)) = crate::formats::safetensors::shard_of(&name) {
                    anyhow::bail!(crate::formats::safetensors::lone_shard_detail(&name, k, n));
                }
                return Ok(Model { path: path.to_owned(), files: None, shards: None });
            }
        };
        let f =
            ModelFolder::open(folder, u64::MAX).with_context(|| format!("reading the folder {}", folder.display()))?;
        Ok(match f.weights {
            HfWeights::Single(p) => Model { path: p, files: Some(f.files), shards: None },
            HfWeights::Sharded(shards) => {
                Model { path: shards[0].0.clone(), files: Some(f.files), shards: Some(shards) }
            }
        })
    }

    fn header(&self) -> anyhow::Result<crate::formats::safetensors::Header> {
        match &self.shards {
            Some(shards) => Ok(crate::formats::hf::merged_header(shards)),
            None => read_header(&self.path, u64::MAX).with_context(|| format!("reading {}", self.path.display())),
        }
    }
}

/// Parses the spec and plans it on the model (with its graph and dataset when given).
/// `memory_limit` is `queue.max_job_memory_bytes` (resolved): a plan predicting more is refused.
fn prepare_job(
    job: &JobArgs,
    model: &Model,
    memory_limit: u64,
) -> anyhow::Result<(crate::compress::plan::Plan, String)> {
    let (mut spec, work_hash, evaluate_given) = load_spec(&job.spec)?;
    let header = model.header()?;
    let graph = job.graph.as_deref().map(load_graph).transpose()?;
    let dataset = match &job.dataset {
        Some(p) => Some(read_header(p, u64::MAX).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let eval = match &job.eval_dataset {
        Some(p) => Some(read_header(p, u64::MAX).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    if !evaluate_given && graph.is_some() && (dataset.is_some() || eval.is_some()) {
        spec.evaluate = Some(EvalOptions::default());
    }
    let teacher = match (&job.teacher, &job.teacher_graph) {
        (Some(model), Some(graph)) => Some(crate::compress::plan::Teacher {
            graph: load_graph(graph)?,
            header: read_header(model, u64::MAX).with_context(|| format!("reading {}", model.display()))?,
        }),
        _ => None,
    };
    let files = model.files.as_ref();
    let inputs = PlanInputs { header, graph, dataset: dataset.as_ref(), eval_dataset: eval.as_ref(), teacher, files };
    let mut plan = prepare(spec, inputs);
    plan.refuse_above_memory(memory_limit);
    Ok((plan, work_hash))
}

/// Temporary files removed when dropped.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A `.txt` dataset (a language model's evaluation text) becomes what the server stores for a
/// text/plain upload: a safetensors file with one U8 tensor `text`, in the temp directory.
fn wrap_text_datasets(job: &mut JobArgs) -> anyhow::Result<TempFiles> {
    let mut made = TempFiles(Vec::new());
    for slot in [&mut job.dataset, &mut job.eval_dataset] {
        let Some(path) = slot.as_ref().filter(|p| p.extension().is_some_and(|e| e == "txt")) else { continue };
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if let Err(e) = std::str::from_utf8(&text) {
            anyhow::bail!("{}: not UTF-8 at byte {}", path.display(), e.valid_up_to());
        }
        let n = text.len();
        let wrapped =
            std::env::temp_dir().join(format!("modelpress-text-{}-{}.safetensors", std::process::id(), made.0.len()));
        // A new file only (never through a link someone left at that name), removed on any error.
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&wrapped)?;
        made.0.push(wrapped.clone());
        let header = crate::formats::safetensors::text_dataset_header(n as u64);
        file.write_all(&(header.len() as u64).to_le_bytes())?;
        file.write_all(&header)?;
        file.write_all(&text)?;
        *slot = Some(wrapped);
    }
    Ok(made)
}

/// A progress bar on a terminal; indicatif draws nothing when stderr is not one.
struct Bar(indicatif::ProgressBar);

impl Control for Bar {
    fn progress(&self, fraction: f64, _step: &str, message: &str) {
        self.0.set_position((fraction * 1000.0) as u64);
        self.0.set_message(message.to_owned());
    }

    fn canceled(&self) -> bool {
        false
    }
}

fn compress(job: &JobArgs, out: &Path, memory_limit: u64) -> anyhow::Result<ExitCode> {
    let mut model = Model::open(&job.model)?;
    let (plan, work_hash) = prepare_job(job, &model, memory_limit)?;
    if !plan.refusals.is_empty() {
        for r in &plan.refusals {
            eprintln!("refused: {}: {}", r.pointer, r.detail);
        }
        return Ok(ExitCode::from(2));
    }
    std::fs::create_dir_all(out)?;
    if std::fs::read_dir(out)?.next().is_some() {
        anyhow::bail!("output directory {} is not empty", out.display());
    }
    // A sharded folder is merged first, in the output directory, and removed at the end: the
    // engine reads one file (the server merges at upload, once).
    let merged_dir = out.join(".input");
    if let Some(shards) = model.shards.take() {
        std::fs::create_dir_all(&merged_dir)?;
        model.path = merged_dir.join("model.safetensors");
        if let Err(e) = crate::formats::hf::merge_shards(&shards, &model.path, &|| false) {
            let _ = std::fs::remove_dir_all(&merged_dir);
            return Err(anyhow::Error::new(e).context("merging the shards"));
        }
    }
    let model = model.path.as_path();
    // Hashed by a thread of its own while the job runs, never as a pass before it.
    let input_sha = engine::PendingSha::start(model, engine::Region::of(&plan));
    let spec_sha = work_hash;
    let bar = indicatif::ProgressBar::new(1000).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {percent:>3}% {elapsed_precise} {msg}").expect("template"),
    );
    // Outputs are written in a hidden directory and moved into place only when all succeeded:
    // a failed or interrupted run leaves no partial file under a final name.
    let staging = out.join(".partial");
    std::fs::create_dir_all(&staging)?;
    let inputs = Inputs {
        model_path: model,
        input_sha256: engine::InputSha::Pending(&input_sha),
        spec_sha256: &spec_sha,
        dataset_path: job.dataset.as_deref(),
        eval_dataset_path: job.eval_dataset.as_deref(),
        teacher_path: job.teacher.as_deref(),
        checkpoint_dir: None,
    };
    let result = engine::execute(&plan, &inputs, &staging, &Bar(bar.clone()));
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&merged_dir);
    let output = match result {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e.into());
        }
    };
    for a in &output.artifacts {
        let dest = out.join(&a.name);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&a.path, &dest)?;
    }
    std::fs::remove_dir_all(&staging)?;
    let t = &output.report.totals;
    let mut summary = format!(
        "{} tensors ({} changed), {} -> {} bytes (x{:.2}), {:.2} bits per weight",
        t.tensors, t.tensors_changed, t.bytes_in, t.bytes_out, t.ratio, t.bits_per_weight
    );
    for a in &output.artifacts {
        summary.push_str(&format!("\n{}", out.join(&a.name).display()));
    }
    print_out(&summary)?;
    Ok(ExitCode::SUCCESS)
}
