//! `phxq dev`: a complete 3-node store on 127.0.0.1 in one command.
//!
//! The three nodes run in this process, each a full server (its own event loop, write-ahead
//! log in its own data directory, peer transport over loopback TCP and client gRPC service),
//! configured like `etc/node{1,2,3}.toml`: one store of 24 replication groups, topic `test`
//! with 8 queues read by consumer group `g1`, client APIs on 127.0.0.1:7100-7102, peers on
//! 7200-7202. It prints what it started, waits until every group has a master, and stops
//! cleanly on Ctrl-C or SIGTERM. Restarted on the same directory, the store resumes from its
//! logs; `--clean` starts empty.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use phxq_node::auth::{Claims, Role, Secret, issue};
use phxq_node::config::ServerConfig;
use phxq_node::server::{NodeHandle, RunningServer};
use phxq_types::NodeId;
use tokio::task::JoinSet;

use crate::table::{Align, render};
use crate::{CommandResult, print_line};

/// Nodes of the dev store.
const NODES: u16 = 3;
/// How long to wait for every group to have a master before saying so, in milliseconds.
const READY_TIMEOUT_MS: u64 = 30_000;
/// How often readiness is checked, in milliseconds.
const READY_POLL_MS: u64 = 100;

/// The dev store's config; `{id}`, `{client_port_N}` and `{peer_port_N}` are filled in. The
/// values are those of `etc/node*.toml` (a test keeps them equal).
const CONFIG_TEMPLATE: &str = r#"
[node]
id = {id}
data_dir = "set by phxq dev"

[store]
id = 1
groups = 24
message_bytes_max = 1048576

[[store.nodes]]
id = 1
client_addr = "127.0.0.1:{client_port_1}"
peer_addr = "127.0.0.1:{peer_port_1}"

[[store.nodes]]
id = 2
client_addr = "127.0.0.1:{client_port_2}"
peer_addr = "127.0.0.1:{peer_port_2}"

[[store.nodes]]
id = 3
client_addr = "127.0.0.1:{client_port_3}"
peer_addr = "127.0.0.1:{peer_port_3}"

[[store.topics]]
name = "test"
queues = 8
consumer_groups = ["g1"]

[tls]
ca = "../tls/ca.pem"
cert = "../tls/node-{id}.pem"
key = "../tls/node-{id}.key"
"#;

/// Arguments of `phxq dev`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Data directory; node N keeps its data in DIR/node-N.
    #[arg(
        long,
        alias = "data-dir",
        value_name = "DIR",
        default_value = "./phxq-data"
    )]
    dir: PathBuf,
    /// Delete DIR/node-1, node-2 and node-3 first, to start with an empty store.
    #[arg(long)]
    clean: bool,
    /// Client port of node 1; nodes 2 and 3 take the next two.
    #[arg(long, default_value_t = 7100)]
    client_port: u16,
    /// Peer port of node 1; nodes 2 and 3 take the next two.
    #[arg(long, default_value_t = 7200)]
    peer_port: u16,
    /// Turn client auth on: a store secret in DIR/store.secret (made once, reused), and an
    /// admin token printed and written to DIR/admin.token (which the CLI uses when run from
    /// the directory holding ./phxq-data and given no --token). Off by default, like a local
    /// NATS or Kafka: anyone on this machine may do anything.
    #[arg(long)]
    auth: bool,
    /// Serve the client ports over TLS with the nodes' certificates (signed by the store CA
    /// in DIR/tls/ca.pem, which clients pass as --ca or PHXQ_CA). Off by default, like a
    /// local NATS, etcd or Kafka: plaintext on 127.0.0.1. The peer ports always use TLS.
    #[arg(long)]
    tls: bool,
}

/// How long the dev store's admin token is valid, in milliseconds (a year).
const DEV_TOKEN_TTL_MS: u64 = 365 * 24 * 3600 * 1000;

pub fn run(args: &Args) -> CommandResult {
    let configs = configs(args)?;
    if args.clean {
        clean(&configs)?;
    }
    // A store CA and every node's certificate, made once and reused on every restart.
    let ids: Vec<_> = configs.iter().map(|config| config.node).collect();
    phxq_node::tls::ensure_store_certs(&args.dir.join("tls"), configs[0].store_id, &ids)?;
    if args.auth {
        admin_token(&args.dir)?;
    }
    // The nodes start one after the other and stop together: their transports' complaints
    // about peers not up yet, or gone, are noise here.
    crate::logging::init("warn,phxq_node::transport=error");
    let runtime = crate::node_cmd::runtime()?;
    let ca = args
        .tls
        .then(|| args.dir.join("tls").join(phxq_node::tls::CA_CERT_FILE));
    runtime.block_on(serve(configs, ca))?;
    Ok(ExitCode::SUCCESS)
}

/// Every node's config, from the template.
fn configs(args: &Args) -> CommandResult<Vec<ServerConfig>> {
    let last_port = |first: u16| first.checked_add(NODES - 1).filter(|_| first > 0);
    if last_port(args.client_port).is_none() || last_port(args.peer_port).is_none() {
        return Err(format!("ports must leave room for {NODES} nodes").into());
    }
    (1..=NODES)
        .map(|id| {
            let mut config =
                ServerConfig::parse(&config_text(id, args.client_port, args.peer_port))?;
            config.data_dir = args.dir.join(format!("node-{id}"));
            // The store CA and node certificates live in DIR/tls, beside the nodes (as in
            // etc/node*.toml, relative to the node's data directory).
            let tls = config.data_dir.join("../tls");
            config.peer_tls = Some(phxq_node::tls::CertFiles {
                ca: tls.join(phxq_node::tls::CA_CERT_FILE),
                cert: tls.join(format!("node-{id}.pem")),
                key: tls.join(format!("node-{id}.key")),
            });
            config.client_tls = args.tls.then(|| config.peer_tls.clone()).flatten();
            config.auth = args.auth.then(|| phxq_node::config::AuthConfig {
                secret_file: args.dir.join("store.secret"),
            });
            Ok(config)
        })
        .collect()
}

/// Makes (or reuses) the store secret in `dir`, then issues an admin token, prints it and
/// writes it to `dir/admin.token` (mode 0600).
fn admin_token(dir: &Path) -> CommandResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let secret = Secret::load_or_create(&dir.join("store.secret"))?;
    let claims = Claims {
        subject: "phxq-dev-admin".to_string(),
        roles: vec![Role::Admin],
        expires_ms: crate::token::now_ms().saturating_add(DEV_TOKEN_TTL_MS),
    };
    let token = issue(&secret, &claims)?;
    let path = dir.join("admin.token");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    writeln!(file, "{token}")?;
    print_line(format_args!(
        "phxq dev: auth on; admin token (also in {}):",
        path.display()
    ))?;
    print_line(format_args!("  {token}"))?;
    Ok(())
}

/// The template filled in for node `id`.
fn config_text(id: u16, client_port: u16, peer_port: u16) -> String {
    let mut text = CONFIG_TEMPLATE.replace("{id}", &id.to_string());
    for n in 1..=NODES {
        text = text
            .replace(
                &format!("{{client_port_{n}}}"),
                &(client_port + n - 1).to_string(),
            )
            .replace(
                &format!("{{peer_port_{n}}}"),
                &(peer_port + n - 1).to_string(),
            );
    }
    text
}

/// Removes the nodes' data directories (only those: DIR may hold other things).
fn clean(configs: &[ServerConfig]) -> CommandResult<()> {
    for config in configs {
        match std::fs::remove_dir_all(&config.data_dir) {
            Ok(()) => print_line(format_args!(
                "phxq dev: removed {}",
                config.data_dir.display()
            ))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(format!("cannot remove {}: {error}", config.data_dir.display()).into());
            }
        }
    }
    Ok(())
}

/// Starts the nodes, serves until a signal or a node failure, then stops them all.
/// `ca`: the CA file clients need (client TLS on), or `None`.
async fn serve(configs: Vec<ServerConfig>, ca: Option<PathBuf>) -> CommandResult<()> {
    let servers = start_all(configs).await?;
    print_started(&servers, ca.as_deref())?;
    let handles: Vec<(NodeId, NodeHandle)> = servers
        .iter()
        .map(|server| (server.config().node, server.handle()))
        .collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut nodes = JoinSet::new();
    for server in servers {
        let node = server.config().node;
        let mut stopped = stopped.clone();
        nodes.spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            (node, server.run_until(stop).await)
        });
    }
    let ready_then_wait = async {
        report_ready(&handles).await;
        std::future::pending::<()>().await;
    };
    let mut failures = Vec::new();
    tokio::select! {
        () = crate::node_cmd::shutdown_signal() => print_line("phxq dev: stopping the store")?,
        () = ready_then_wait => unreachable!("never completes"),
        Some(ended) = nodes.join_next() => failures.extend(failure(ended)),
    }
    stop.send_replace(true);
    while let Some(ended) = nodes.join_next().await {
        failures.extend(failure(ended));
    }
    if failures.is_empty() {
        print_line("phxq dev: stopped cleanly")?;
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}

/// The error of a node task that ended badly, if it did.
fn failure(
    ended: Result<(NodeId, Result<(), phxq_node::server::ServerError>), tokio::task::JoinError>,
) -> Option<String> {
    match ended {
        Ok((_, Ok(()))) => None,
        Ok((node, Err(error))) => Some(format!("{node}: {error}")),
        Err(error) => Some(format!("a node task failed: {error}")),
    }
}

/// Starts every node at once (so no node waits long for its peers); if one fails, stops
/// those started and returns its error.
async fn start_all(configs: Vec<ServerConfig>) -> CommandResult<Vec<RunningServer>> {
    let mut starts = JoinSet::new();
    for (position, config) in configs.into_iter().enumerate() {
        starts.spawn(async move {
            let node = config.node;
            let started = RunningServer::start(config).await;
            (position, node, started)
        });
    }
    let mut servers = Vec::new();
    let mut failure = None;
    while let Some(joined) = starts.join_next().await {
        match joined {
            Ok((position, _, Ok(server))) => servers.push((position, server)),
            Ok((_, node, Err(error))) => failure = Some(format!("cannot start {node}: {error}")),
            Err(error) => failure = Some(format!("a node failed to start: {error}")),
        }
    }
    if let Some(failure) = failure {
        for (_, server) in servers {
            let _ = server.run_until(async {}).await;
        }
        return Err(failure.into());
    }
    servers.sort_by_key(|(position, _)| *position);
    Ok(servers.into_iter().map(|(_, server)| server).collect())
}

fn print_started(servers: &[RunningServer], ca: Option<&Path>) -> CommandResult<()> {
    let first = servers[0].config();
    print_line(format_args!(
        "phxq dev: started a {}-node store on 127.0.0.1 (store {}, {} replication groups)",
        servers.len(),
        first.store_id,
        first.layout.groups
    ))?;
    let rows: Vec<Vec<String>> = servers
        .iter()
        .map(|server| {
            vec![
                server.config().node.to_string(),
                server.client_addr().to_string(),
                server.peer_addr().to_string(),
                server.config().data_dir.display().to_string(),
            ]
        })
        .collect();
    let columns = [
        ("node", Align::Left),
        ("client (gRPC)", Align::Left),
        ("peer", Align::Left),
        ("data directory", Align::Left),
    ];
    for line in render(&columns, &rows).lines() {
        print_line(format_args!("  {line}"))?;
    }
    for topic in &first.layout.topics {
        print_line(format_args!(
            "  topic {:?}: {} queues; consumer groups: {}",
            topic.name,
            topic.queues,
            topic.consumer_groups.join(", ")
        ))?;
    }
    let server = servers[0].client_addr();
    let mut flag = if server.port() == 7100 {
        String::new()
    } else {
        format!(" --server {server}")
    };
    if let Some(ca) = ca {
        print_line(format_args!(
            "  client ports serve TLS: clients verify them with the store CA {} \
             (--ca FILE, or export PHXQ_CA={})",
            ca.display(),
            ca.display()
        ))?;
        flag += &format!(" --ca {}", ca.display());
    }
    print_line("  try:")?;
    print_line(format_args!(
        "    seq 1 10 | phxq produce{flag} --topic test --key k1"
    ))?;
    print_line(format_args!(
        "    phxq consume{flag} --topic test --group g1 --json"
    ))?;
    print_line(format_args!("    phxq cluster status{flag}"))?;
    print_line("  Ctrl-C (or SIGTERM) stops the store.")?;
    Ok(())
}

/// Waits until every group has a master with a lease, and says so (or says it is late).
async fn report_ready(handles: &[(NodeId, NodeHandle)]) {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(READY_TIMEOUT_MS);
    let mut warned = false;
    loop {
        let masters = masters(handles).await;
        if let Some(masters) = &masters {
            let counts: Vec<String> = handles
                .iter()
                .map(|(node, _)| {
                    format!("{node}: {}", masters.iter().filter(|m| *m == node).count())
                })
                .collect();
            let _ = print_line(format_args!(
                "phxq dev: ready in {:.1} s: every group has a master ({})",
                start.elapsed().as_secs_f64(),
                counts.join(", ")
            ));
            return;
        }
        if !warned && Instant::now() > deadline {
            warned = true;
            let _ = print_line(format_args!(
                "phxq dev: still waiting for masters after {} s (see `phxq cluster status`)",
                READY_TIMEOUT_MS / 1000
            ));
        }
        tokio::time::sleep(Duration::from_millis(READY_POLL_MS)).await;
    }
}

/// The master (with a lease) of every group, or `None` while some group has none.
async fn masters(handles: &[(NodeId, NodeHandle)]) -> Option<Vec<NodeId>> {
    let mut masters: Vec<Option<NodeId>> = Vec::new();
    for (node, handle) in handles {
        let status = handle.status().await?;
        masters.resize(masters.len().max(status.groups.len()), None);
        for (slot, group) in masters.iter_mut().zip(&status.groups) {
            if group.lease_remaining_ms.is_some() {
                *slot = Some(*node);
            }
        }
    }
    masters.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn args(dir: &str) -> Args {
        Args {
            dir: PathBuf::from(dir),
            clean: false,
            client_port: 7100,
            peer_port: 7200,
            auth: false,
            tls: false,
        }
    }

    /// `phxq dev` runs the store that `etc/` describes: same members, layout and timing.
    #[test]
    fn the_dev_store_is_the_store_of_the_sample_configs() {
        let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../etc");
        for (i, dev) in configs(&args("phxq-data")).unwrap().into_iter().enumerate() {
            let path = etc.join(format!("node{}.toml", i + 1));
            let sample = ServerConfig::load(&path).unwrap();
            assert_eq!(sample.node, dev.node);
            assert_eq!(sample.data_dir, dev.data_dir, "{}", path.display());
            assert_eq!(sample.client_listen, dev.client_listen);
            assert_eq!(sample.peer_listen, dev.peer_listen);
            assert_eq!(sample.store_id, dev.store_id);
            assert_eq!(sample.members, dev.members);
            assert_eq!(sample.layout, dev.layout);
            assert_eq!(format!("{:?}", sample.timing), format!("{:?}", dev.timing));
            assert_eq!(sample.limits, dev.limits);
            assert_eq!(sample.peer_tls, dev.peer_tls);
            let dev_auth = configs(&Args {
                auth: true,
                ..args("phxq-data")
            })
            .unwrap()
            .remove(i)
            .auth;
            assert_eq!(sample.auth, dev_auth, "{}", path.display());
            let dev_tls = configs(&Args {
                tls: true,
                ..args("phxq-data")
            })
            .unwrap()
            .remove(i)
            .client_tls;
            assert_eq!(sample.client_tls, dev_tls, "{}", path.display());
            assert!(dev.client_tls.is_none(), "plaintext unless --tls");
        }
    }

    #[test]
    fn ports_follow_the_first_node() {
        let mut args = args("d");
        args.client_port = 17100;
        args.peer_port = 17200;
        let nodes = configs(&args).unwrap();
        assert_eq!(nodes[2].client_listen.port(), 17102);
        assert_eq!(nodes[2].peer_listen.port(), 17202);
        assert_eq!(nodes[1].data_dir, PathBuf::from("d/node-2"));
        args.peer_port = u16::MAX - 1;
        assert!(configs(&args).is_err());
    }
}
