//! `phxq cert`: a store's CA and its nodes' certificates, as PEM files (keys 0600), for the
//! `[tls]` section of node configs. Existing files are kept: a CA is never replaced by
//! accident, and re-running is harmless.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use phxq_types::NodeId;

use crate::CommandResult;

/// What to make.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// A store's CA: DIR/ca.pem and DIR/ca.key.
    Ca {
        /// Directory of the files.
        #[arg(long)]
        dir: PathBuf,
        /// The store's id (`[store] id`).
        #[arg(long)]
        store_id: u64,
    },
    /// A node's certificate signed by the CA in DIR: DIR/node-K.pem and DIR/node-K.key.
    Node {
        /// Directory of the CA and of the new files.
        #[arg(long)]
        dir: PathBuf,
        /// The store's id.
        #[arg(long)]
        store_id: u64,
        /// The node's id.
        #[arg(long)]
        id: u64,
        /// Extra DNS names or IP addresses clients reach the node by (repeat): with client
        /// TLS, its `client_addr` IP at least (the node refuses to start otherwise).
        /// `localhost` and `127.0.0.1` are always named.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

/// Runs `phxq cert`.
pub fn run(command: &CertCommand) -> CommandResult {
    match command {
        CertCommand::Ca { dir, store_id } => {
            let path = phxq_node::tls::ensure_ca(dir, *store_id)?;
            crate::print_line(path.display())?;
        }
        CertCommand::Node {
            dir,
            store_id,
            id,
            hosts,
        } => {
            if *id == 0 {
                return Err("node ids start at 1".into());
            }
            let local = phxq_node::tls::LOCAL_HOSTS.map(String::from);
            let extra = hosts.iter().filter(|host| !local.contains(host)).cloned();
            let names: Vec<String> = local.iter().cloned().chain(extra).collect();
            let files = phxq_node::tls::ensure_node_cert(dir, *store_id, NodeId(*id), &names)?;
            crate::print_line(phxq_node::tls::config_section(&files))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
