//! `lime-stage`: one stage of a lime ring. Settings come from a TOML file and
//! `LIME_STAGE_…` environment variables; see `lime_stage::config`.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lime-stage",
    version,
    about = "One stage of a lime pipeline ring"
)]
struct Cli {
    /// TOML settings; environment variables override them.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Measure this device for the planner (compute, storage reads, memory) with
    /// the configured model and settings, print the profile and exit.
    #[arg(long)]
    profile: bool,
    /// With --profile: also write it to this file (JSON).
    #[arg(long, requires = "profile")]
    out: Option<PathBuf>,
}

/// `--profile`: measures, prints and writes the profile.
fn profile(cfg: lime_stage::config::StageConfig, out: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(n) = cfg.compute_threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()?;
    }
    let (device, _) =
        lime_stage::control::profile::measure(&cfg, |step| eprintln!("profiling: {step}"))?;
    let text = serde_json::to_string_pretty(&device)?;
    println!("{text}");
    if let Some(out) = out {
        std::fs::write(&out, text + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
        eprintln!("profile written to {}", out.display());
    }
    Ok(())
}

fn main() {
    lime_stage::memory::return_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = lime_stage::config::StageConfig::load(cli.config.as_deref()).and_then(|cfg| {
        if cli.profile {
            profile(cfg, cli.out)
        } else {
            lime_stage::run(cfg)
        }
    });
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("lime-stage: {e:#}");
        std::process::exit(1);
    }
}
