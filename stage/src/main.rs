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
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result =
        lime_stage::config::StageConfig::load(cli.config.as_deref()).and_then(lime_stage::run);
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("lime-stage: {e:#}");
        std::process::exit(1);
    }
}
