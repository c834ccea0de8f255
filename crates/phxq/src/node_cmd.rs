//! `phxq node --config FILE`: runs one node of a store until SIGINT or SIGTERM.
//!
//! The node stops gracefully on a signal (exit 0). If it stops on its own, something voided
//! its durability promise (an fsync failed, the log is damaged): it logs why and exits 1,
//! rather than serving on.

use std::path::PathBuf;
use std::process::ExitCode;

use phxq_node::config::ServerConfig;
use phxq_node::server::RunningServer;

use crate::CommandResult;

/// Arguments of `phxq node`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node's TOML config (see etc/node1.toml for every key).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// This node's disk was lost: start on an empty (or missing) log although the data
    /// directory says the node ran before, and neither vote nor campaign in a group until
    /// it caught up with that group's master. Safe only while the other members still hold
    /// a majority of the old voters' data (README: "A node that lost its disk").
    #[arg(long)]
    rejoin_empty: bool,
}

pub fn run(args: &Args) -> CommandResult {
    let mut config = ServerConfig::load(&args.config)?;
    config.rejoin_empty = args.rejoin_empty;
    crate::logging::init("info");
    let runtime = runtime()?;
    runtime.block_on(async {
        let server = RunningServer::start(config).await?;
        server.run_until(shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The tokio runtime of the server commands (the node's event loop has its own threads).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("phxq-io")
        .build()
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM. If the handlers cannot be installed the
/// process cannot be stopped gracefully: say so and never resolve (SIGKILL still works, and
/// the log makes that safe).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (interrupt, terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(interrupt), Ok(terminate)) => (interrupt, terminate),
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(%error, "cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        }
    };
    let (mut interrupt, mut terminate) = (interrupt, terminate);
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    tracing::info!(signal = name, "stopping");
}
