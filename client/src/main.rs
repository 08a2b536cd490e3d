//! `lime`: the user's command line. Parsing only; the work is in the library.

use clap::{Args, Parser, Subcommand};
use lime::generate::GenerateArgs;
use lime_kernels::synth::{Preset, StoredDtype};
use lime_schemas::SamplingParams;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lime",
    version,
    about = "Lossless LLM inference on memory-constrained edge devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a random-weight Llama checkpoint in the Hugging Face layout.
    Synth {
        /// tiny (~3 MB, tests), small (~100 MB), bench (~750 MB, benchmarks).
        #[arg(long, default_value = "tiny")]
        preset: Preset,
        /// Stored dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: StoredDtype,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Directory to write (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate from a checkpoint in this one process (the reference output).
    Generate(GenerateCli),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Single-process decode and prefill throughput against the memory roofline.
    Kernels {
        /// Checkpoint directory; the `bench` preset is synthesised there if empty.
        #[arg(long, default_value = "models/bench")]
        model: PathBuf,
        /// Decode steps timed per batch size.
        #[arg(long, default_value_t = 24)]
        steps: usize,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct GenerateCli {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (tokenized with the checkpoint's tokenizer, BOS added).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as token ids, comma or space separated, used as given.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print generated token ids instead of text.
    #[arg(long)]
    print_ids: bool,
    /// Write every step's logits (f32 little-endian, vocab per step) to this file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("lime: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Synth {
            preset,
            dtype,
            seed,
            out,
        } => lime::synth::run(preset, dtype, seed, &out),
        Command::Generate(g) => lime::generate::run(&GenerateArgs {
            model: g.model,
            prompt: g.prompt,
            prompt_ids: g.prompt_ids,
            max_tokens: g.max_tokens,
            sampling: SamplingParams {
                temperature: g.temperature,
                top_p: g.top_p,
                top_k: g.top_k,
                repetition_penalty: g.repetition_penalty,
                seed: g.seed,
            },
            ignore_eos: g.ignore_eos,
            print_ids: g.print_ids,
            logits_out: g.logits_out,
        }),
        Command::Bench { what } => match what {
            BenchCommand::Kernels { model, steps, json } => {
                lime::synth::ensure(Preset::Bench, &model)?;
                let report = lime::bench::kernels(&model, steps)?;
                println!("{report}");
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                }
                Ok(())
            }
        },
    }
}
