//! `lime plan`: the planner on a model and a set of device profiles, printing the
//! plan and what the cost model predicts for it.

use anyhow::Context;
use lime_kernels::{checkpoint, Checkpoint, Config};
use lime_plan::{self as planner, files, Runtime, Workload, WorkloadKind};
use lime_schemas::ModelShape;
use std::path::{Path, PathBuf};

/// What to plan (`lime plan`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// A checkpoint directory, or a `config.json` alone (a model you do not have).
    #[arg(long)]
    pub model: PathBuf,
    /// Device profiles: one profile, or a list of `[[device]]` entries (TOML or JSON).
    #[arg(long)]
    pub devices: PathBuf,
    /// The network: a default link and exceptions (TOML or JSON).
    #[arg(long)]
    pub links: PathBuf,
    /// sporadic (minimise time per token) or bursty (maximise tokens/s).
    #[arg(long, default_value = "sporadic")]
    pub workload: WorkloadKind,
    /// Sequences generating at once, for the bursty workload.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Tokens of context each sequence's KV cache is planned for.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// Prompt length for the predicted time to first token.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Most layer slots a stage streams through.
    #[arg(long, default_value_t = 2)]
    pub max_slots: usize,
    /// The stages' activation workspace in tokens.
    #[arg(long, default_value_t = 512)]
    pub activation_tokens: usize,
    /// Largest interleave degree considered.
    #[arg(long, default_value_t = 8)]
    pub max_interleave: usize,
    /// Also print the plan document as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the plan (the `lime/control/plan` document) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The model's shape: from the checkpoint's headers when there are weights, else
/// from `config.json` with the dtype it declares (bf16 when it declares none).
pub fn model_shape(path: &Path) -> anyhow::Result<ModelShape> {
    let has_weights = path.is_dir()
        && (path.join(checkpoint::SINGLE_FILE).is_file()
            || path.join(checkpoint::INDEX_FILE).is_file());
    if has_weights {
        return Ok(Checkpoint::open(path)?.shape());
    }
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let cfg = Config::from_file(&file)?;
    let name = file
        .parent()
        .filter(|_| file.file_name().is_some_and(|n| n == "config.json"))
        .and_then(|d| d.file_name())
        .or_else(|| file.file_stem())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok(cfg.shape(&name, cfg.declared_dtype_bytes().unwrap_or(2)))
}

pub fn run(args: &PlanArgs) -> anyhow::Result<()> {
    let shape = model_shape(&args.model)
        .with_context(|| format!("reading the model {}", args.model.display()))?;
    let devices = files::load_devices(&args.devices)?;
    let links = files::load_links(&args.links)?;
    let workload = Workload {
        kind: args.workload,
        concurrency: match args.workload {
            WorkloadKind::Sporadic => 1,
            WorkloadKind::Bursty => args.concurrency.max(1),
        },
        context: args.context,
        prompt_tokens: args.prompt_tokens,
    };
    let problem = planner::Problem {
        shape: &shape,
        devices: &devices,
        links: &links,
        workload,
        runtime: Runtime {
            max_slots: args.max_slots,
            activation_tokens: args.activation_tokens,
            max_interleave: args.max_interleave,
        },
        starter: None,
    };
    let started = std::time::Instant::now();
    let planned = planner::plan(&problem, 1)?;
    let took = started.elapsed();
    print!("{}", planner::render(&problem, &planned));
    println!("planned in {:.0} ms", took.as_secs_f64() * 1e3);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&planned.plan)?);
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&planned.plan)?)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("plan written to {}", out.display());
    }
    Ok(())
}
