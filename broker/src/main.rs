//! `lime-broker`: the embedded MQTT broker of a lime cluster. Settings come from a
//! TOML file and `LIME_BROKER_…` environment variables; see `lime_broker::config`.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "lime-broker", version, about = "lime's embedded MQTT broker")]
struct Cli {
    /// TOML settings; environment variables override them.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = match lime_broker::config::BrokerConfig::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lime-broker: {e:#}");
            std::process::exit(1);
        }
    };
    // rumqttd has no stop call and keeps only in-memory state, so a signal ends the
    // process once it is logged; clients see the connection close.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lime-broker: {e}");
            std::process::exit(1);
        }
    };
    std::thread::spawn(move || {
        if let Err(e) = lime_broker::run(&cfg) {
            tracing::error!("{e:#}");
            eprintln!("lime-broker: {e:#}");
            std::process::exit(1);
        }
    });
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    });
    lime_broker::service::stopping();
    tracing::info!("lime-broker shutting down");
}
