//! Logs of the server commands: `tracing` events to standard error, filtered like `RUST_LOG`
//! (`RUST_LOG=debug`, `RUST_LOG=phxq_node=debug,warn`, ...).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Sends log events to standard error, filtered by `RUST_LOG` or else by `default_filter`.
/// A `RUST_LOG` that does not parse is reported and the default used.
pub fn init(default_filter: &str) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(text) if !text.is_empty() => EnvFilter::try_new(&text).unwrap_or_else(|error| {
            eprintln!("phxq: ignoring RUST_LOG={text:?}: {error}");
            EnvFilter::new(default_filter)
        }),
        _ => EnvFilter::new(default_filter),
    };
    // Fails only if a subscriber is already set (not the case in this binary).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
