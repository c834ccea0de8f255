//! A replicated store as an operator and a client meet it: three `phxq node` processes started
//! from generated configs on 127.0.0.1 (ports chosen by the kernel), used through the CLI
//! (`produce`, `consume`, `cluster status`), stopped with SIGTERM and restarted; and
//! `phxq dev`. Every wait is bounded.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a store may take to elect a master for every group.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Replication groups of the test store (fewer than the default, to keep CI light).
const GROUPS: u32 = 6;
/// Queues of topic `test`.
const QUEUES: u32 = 4;

fn phxq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_phxq"))
}

/// Runs `phxq ARGS` with `input` on standard input.
fn run(args: &[&str], input: &[u8]) -> Output {
    let mut child = phxq()
        .args(args)
        .env_remove("PHXQ_SERVER")
        .env_remove("PHXQ_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run phxq");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // The command may exit before reading everything (bad input): that is fine.
        let _ = stdin.write_all(&input);
    });
    let output = child.wait_with_output().expect("wait for phxq");
    writer.join().expect("stdin writer");
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Ports nobody listens on right now (the kernel's choice; released before use).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Sends SIGTERM to `child`.
fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Waits for `child` to exit, at most `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A 3-node store of `phxq node` processes; killed when dropped.
struct Store {
    dir: tempfile::TempDir,
    client_ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
    /// TOML appended to every node's config.
    extra_config: String,
}

impl Store {
    fn start() -> Store {
        Store::start_with("")
    }

    /// A store whose nodes' configs end with `extra_config` (e.g. a `[limits]` section).
    fn start_with(extra_config: &str) -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = free_ports(6);
        let (client_ports, peer_ports) = ports.split_at(3);
        let mut store = Store {
            dir,
            client_ports: client_ports.to_vec(),
            nodes: Vec::new(),
            extra_config: extra_config.to_string(),
        };
        for id in 1..=3 {
            let config = store.config_text(id, peer_ports);
            std::fs::write(store.config_path(id), config).expect("write config");
            let child = store.spawn(id);
            store.nodes.push(Some(child));
        }
        store.wait_ready();
        store
    }

    fn config_text(&self, id: usize, peer_ports: &[u16]) -> String {
        let mut text = format!(
            "[node]\nid = {id}\ndata_dir = {:?}\n\n[store]\nid = 1\ngroups = {GROUPS}\n\n",
            self.dir
                .path()
                .join(format!("node-{id}"))
                .display()
                .to_string()
        );
        for (n, (client, peer)) in self.client_ports.iter().zip(peer_ports).enumerate() {
            text += &format!(
                "[[store.nodes]]\nid = {}\nclient_addr = \"127.0.0.1:{client}\"\npeer_addr = \"127.0.0.1:{peer}\"\n\n",
                n + 1
            );
        }
        text += &format!(
            "[[store.topics]]\nname = \"test\"\nqueues = {QUEUES}\nconsumer_groups = [\"g1\", \"audit\"]\n"
        );
        text += &self.extra_config;
        let ids: Vec<_> = (1..=peer_ports.len() as u64)
            .map(phxq_types::NodeId)
            .collect();
        let files = phxq_node::tls::ensure_store_certs(&self.dir.path().join("tls"), 1, &ids)
            .expect("test certificates");
        text += &phxq_node::tls::config_section(&files[id - 1]);
        text
    }

    fn config_path(&self, id: usize) -> PathBuf {
        self.dir.path().join(format!("node{id}.toml"))
    }

    fn spawn(&self, id: usize) -> Child {
        self.spawn_with(id, &[])
    }

    fn server(&self, id: usize) -> String {
        format!("127.0.0.1:{}", self.client_ports[id - 1])
    }

    fn log(&self, id: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{id}.log"))).unwrap_or_default()
    }

    /// `phxq cluster status --json` asked of node `id`.
    fn status(&self, id: usize) -> Option<Value> {
        let server = self.server(id);
        let output = run(
            &[
                "cluster",
                "status",
                "--json",
                "--server",
                &server,
                "--timeout-ms",
                "1000",
            ],
            b"",
        );
        output
            .status
            .success()
            .then(|| serde_json::from_slice(&output.stdout).expect("status JSON"))
    }

    /// Waits until node 1 sees every node up and a master with a lease for every group.
    fn wait_ready(&self) -> Value {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.status(1)
                && status["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|n| n["up"] == true)
                && status["groups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|g| g["master"].is_u64())
            {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no master for every group within {READY_TIMEOUT:?}; node 1 log:\n{}",
                self.log(1)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn produce(&self, extra: &[&str], input: &[u8]) -> Output {
        let server = self.server(2);
        let mut args = vec!["produce", "--server", &server, "--topic", "test"];
        args.extend_from_slice(extra);
        run(&args, input)
    }

    /// Consumes everything for `group` (node 3 asked first), one JSON object per message.
    fn consume_all(&self, group: &str) -> Vec<Value> {
        let server = self.server(3);
        let output = run(
            &[
                "consume", "--server", &server, "--topic", "test", "--group", group, "--json",
            ],
            b"",
        );
        assert!(output.status.success(), "consume: {}", text(&output.stderr));
        text(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Values of consumed messages by queue, checking offsets are dense from 1 on each queue.
fn values_by_queue(messages: &[Value]) -> BTreeMap<u64, Vec<String>> {
    let mut queues: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for message in messages {
        let queue = message["queue"].as_u64().expect("queue");
        let values = queues.entry(queue).or_default();
        assert_eq!(
            message["offset"].as_u64(),
            Some(values.len() as u64 + 1),
            "offsets are dense from 1: {message}"
        );
        assert!(
            message["time_ms"].as_u64().is_some_and(|t| t > 0),
            "{message}"
        );
        values.push(message["value"].as_str().expect("value").to_string());
    }
    queues
}

#[test]
fn lines_produced_through_one_node_are_consumed_in_order_per_queue_through_another() {
    let store = Store::start();
    let lines: String = (1..=200).map(|i| format!("m{i:03}\n")).collect();
    let produced = store.produce(&[], lines.as_bytes());
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    assert!(
        text(&produced.stderr).contains("200 message(s) acknowledged"),
        "{}",
        text(&produced.stderr)
    );
    let keyed: String = (1..=30).map(|i| format!("k{i:03}\n")).collect();
    let produced = store.produce(&["--key", "user-42"], keyed.as_bytes());
    assert!(produced.status.success(), "{}", text(&produced.stderr));

    let messages = store.consume_all("g1");
    assert_eq!(messages.len(), 230, "every acknowledged line, once");
    let queues = values_by_queue(&messages);
    assert_eq!(
        queues.len(),
        QUEUES as usize,
        "round-robin reaches every queue"
    );
    let mut unkeyed = Vec::new();
    for values in queues.values() {
        let plain: Vec<&String> = values.iter().filter(|v| v.starts_with('m')).collect();
        assert!(
            plain.windows(2).all(|w| w[0] < w[1]),
            "order per queue: {plain:?}"
        );
        unkeyed.extend(plain.into_iter().cloned());
    }
    unkeyed.sort();
    let expected: Vec<String> = (1..=200).map(|i| format!("m{i:03}")).collect();
    assert_eq!(unkeyed, expected);
    let keyed_queues: Vec<u64> = queues
        .iter()
        .filter(|(_, values)| values.iter().any(|v| v.starts_with('k')))
        .map(|(queue, _)| *queue)
        .collect();
    assert_eq!(keyed_queues.len(), 1, "one key, one queue");
    let keyed_values: Vec<&String> = queues[&keyed_queues[0]]
        .iter()
        .filter(|v| v.starts_with('k'))
        .collect();
    let expected: Vec<String> = (1..=30).map(|i| format!("k{i:03}")).collect();
    assert_eq!(
        keyed_values,
        expected.iter().collect::<Vec<_>>(),
        "a key's messages keep their order"
    );
    assert!(messages.iter().filter(|m| m["key"] == "user-42").count() == 30);

    assert!(
        store.consume_all("g1").is_empty(),
        "the cursor was committed"
    );
    assert_eq!(
        store.consume_all("audit").len(),
        230,
        "every consumer group gets every message"
    );
}

#[test]
fn cluster_status_shows_every_node_and_a_master_with_a_lease_for_every_group() {
    let store = Store::start();
    let status = store.wait_ready();
    assert_eq!(status["store_id"], 1);
    assert_eq!(status["groups_count"], GROUPS);
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let groups = status["groups"].as_array().unwrap();
    assert_eq!(groups.len(), GROUPS as usize);
    for group in groups {
        assert!(group["master"].is_u64(), "{group}");
        assert!(group["lease_remaining_ms"].as_u64().unwrap() > 0, "{group}");
    }
    let mastered: u64 = nodes.iter().map(|n| n["masters"].as_u64().unwrap()).sum();
    assert_eq!(mastered, u64::from(GROUPS));
    for node in nodes {
        // A healthy store: no peer message dropped, every compaction written.
        assert_eq!(node["peer_messages_rejected"], 0, "{node}");
        assert_eq!(node["compactions_refused"], 0, "{node}");
    }
    assert_eq!(status["topics"][0]["name"], "test");
    assert_eq!(status["topics"][0]["queues"], QUEUES);

    let table = run(&["cluster", "status", "--server", &store.server(2)], b"");
    assert!(table.status.success());
    let table = text(&table.stdout);
    assert!(
        table.contains("store 1: 3 nodes, 6 replication groups"),
        "{table}"
    );
    assert!(table.contains("lease_ms"), "{table}");
    assert!(table.contains("compact_refused"), "{table}");
}

/// A bad request: the expected typed error on standard error, exit 1, and nothing stored.
fn refused(output: &Output, expected: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{expected}: {stderr}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
}

#[test]
fn bad_input_gets_a_typed_error_a_non_zero_exit_and_changes_nothing() {
    let store = Store::start();
    let server = store.server(1);
    let produce = |args: &[&str], input: &[u8]| {
        let mut all = vec!["produce", "--server", &server];
        all.extend_from_slice(args);
        run(&all, input)
    };
    refused(&produce(&["--topic", "nope"], b"x\n"), "UNKNOWN_TOPIC(3)");
    refused(
        &produce(&["--topic", "no spaces"], b"x\n"),
        "INVALID_NAME(8)",
    );
    refused(
        &produce(&["--topic", "test", "--queue", "4"], b"x\n"),
        "UNKNOWN_QUEUE(5)",
    );
    refused(&produce(&["--topic", "test"], b""), "EMPTY_BATCH(7)");
    let oversize = vec![b'x'; (1 << 20) + 1];
    refused(
        &produce(&["--topic", "test"], &oversize),
        "MESSAGE_TOO_LARGE(6)",
    );
    let long_key = "k".repeat(1025);
    refused(
        &produce(&["--topic", "test", "--key", &long_key], b"x\n"),
        "MESSAGE_TOO_LARGE(6)",
    );

    let consume = |args: &[&str]| {
        let mut all = vec!["consume", "--server", &server, "--topic", "test"];
        all.extend_from_slice(args);
        run(&all, b"")
    };
    refused(
        &consume(&["--group", "nobody"]),
        "UNKNOWN_CONSUMER_GROUP(4)",
    );
    refused(&consume(&["--group", "bad/name"]), "INVALID_NAME(8)");
    refused(
        &consume(&["--group", "g1", "--wait-ms", "60001"]),
        "INVALID_ARGUMENT(10)",
    );

    refused(
        &run(&["cluster", "status", "--server", "nonsense"], b""),
        "invalid --server",
    );
    let nobody = format!("127.0.0.1:{}", free_ports(1)[0]);
    refused(
        &run(
            &[
                "cluster",
                "status",
                "--server",
                &nobody,
                "--timeout-ms",
                "300",
            ],
            b"",
        ),
        "no answer from",
    );

    assert!(store.consume_all("g1").is_empty(), "nothing was stored");
    let status = store.status(1).expect("status");
    for group in status["groups"].as_array().unwrap() {
        assert!(group["master"].is_u64(), "the store still serves: {group}");
    }
}

#[test]
fn a_node_stopped_with_sigterm_exits_0_and_restarts_from_its_log() {
    let mut store = Store::start();
    let produced = store.produce(&[], b"before-1\nbefore-2\n");
    assert!(produced.status.success(), "{}", text(&produced.stderr));

    let mut node1 = store.nodes[0].take().expect("node 1");
    terminate(&node1);
    let status = wait_exit(&mut node1, STOP_TIMEOUT).expect("node 1 stops after SIGTERM");
    assert!(
        status.success(),
        "graceful stop exits 0: {status:?}\n{}",
        store.log(1)
    );
    assert!(store.log(1).contains("stopped"), "{}", store.log(1));

    // Two of three nodes still serve: the groups node 1 mastered move to the others.
    let produced = store.produce(&[], b"during\n");
    assert!(produced.status.success(), "{}", text(&produced.stderr));

    store.nodes[0] = Some(store.spawn(1));
    store.wait_ready();
    let values: Vec<String> = store
        .consume_all("g1")
        .iter()
        .map(|m| m["value"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = values.clone();
    sorted.sort();
    assert_eq!(sorted, ["before-1", "before-2", "during"]);
}

#[test]
fn a_node_that_is_not_the_master_answers_not_master_with_the_masters_client_address() {
    use phxq_proto::api::{self, phxq_client::PhxqClient};
    use phxq_types::ErrorCode;

    let store = Store::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Masters may move while placement settles: ask again until a non-master answers.
    for _ in 0..20 {
        let status = store.wait_ready();
        let master = status["groups"][0]["master"].as_u64().unwrap() as usize;
        let other = if master == 1 { 2 } else { 1 };
        let response = runtime.block_on(async {
            let mut client = PhxqClient::connect(format!("http://{}", store.server(other)))
                .await
                .expect("connect");
            let request = api::ProduceRequest {
                store_id: 0,
                topic: "test".to_string(),
                queue: 0, // group 0
                message_id: Vec::new(),
                messages: vec![api::Message {
                    key: Vec::new(),
                    value: b"redirected".to_vec(),
                }],
            };
            client.produce(request).await.expect("produce").into_inner()
        });
        let Err(failure) = api::check(response.error.as_ref()) else {
            continue; // node `other` became the master meanwhile
        };
        assert_eq!(failure.code, Some(ErrorCode::NotMaster), "{failure}");
        let master_addr = failure.master_addr.expect("NOT_MASTER names the master");
        assert_ne!(master_addr, store.server(other));
        assert!(
            (1..=3).any(|id| store.server(id) == master_addr),
            "{master_addr}"
        );
        assert!(
            store.consume_all("g1").is_empty(),
            "a refused produce stores nothing"
        );
        return;
    }
    panic!("node answered as master every time");
}

#[test]
fn a_request_for_another_store_gets_wrong_store_and_changes_nothing() {
    use phxq_proto::api::{self, phxq_client::PhxqClient};
    use phxq_types::ErrorCode;

    let store = Store::start();
    store.wait_ready();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let failure = runtime.block_on(async {
        let mut client = PhxqClient::connect(format!("http://{}", store.server(1)))
            .await
            .expect("connect");
        let request = api::ProduceRequest {
            store_id: 999,
            topic: "test".to_string(),
            queue: 0,
            message_id: Vec::new(),
            messages: vec![api::Message {
                key: Vec::new(),
                value: b"misrouted".to_vec(),
            }],
        };
        let response = client.produce(request).await.expect("produce").into_inner();
        api::check(response.error.as_ref()).expect_err("another store's request is refused")
    });
    assert_eq!(failure.code, Some(ErrorCode::WrongStore), "{failure}");
    assert!(store.consume_all("g1").is_empty(), "nothing was written");
}

#[test]
fn produce_many_appends_atomically_through_the_grpc_api_and_refuses_mixed_groups() {
    use phxq_proto::api::{self, phxq_client::PhxqClient};
    use phxq_types::ErrorCode;

    let append = |queue: u32, values: &[&str]| api::Append {
        topic: "test".to_string(),
        queue,
        message_id: Vec::new(),
        messages: values
            .iter()
            .map(|v| api::Message {
                key: Vec::new(),
                value: v.as_bytes().to_vec(),
            })
            .collect(),
    };
    let store = Store::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcomes = runtime.block_on(async {
        // The master of group 0 (queue 0); placement may still move it: follow NOT_MASTER.
        async fn call(server: &str, request: api::ProduceManyRequest) -> api::ProduceManyResponse {
            let mut client = PhxqClient::connect(format!("http://{server}"))
                .await
                .expect("connect");
            client
                .produce_many(request)
                .await
                .expect("produce_many")
                .into_inner()
        }
        let mut server = store.server(1);
        let good = api::ProduceManyRequest {
            appends: vec![append(0, &["a", "b"]), append(0, &["c"])],
            store_id: 0,
        };
        let mut accepted = None;
        for _ in 0..100 {
            store.wait_ready();
            let response = call(&server, good.clone()).await;
            match api::check(response.error.as_ref()) {
                Ok(()) => {
                    accepted = Some(response.results);
                    break;
                }
                Err(failure) if failure.code == Some(ErrorCode::NotMaster) => {
                    if let Some(master) = failure.master_addr {
                        server = master;
                    }
                }
                Err(failure) if failure.code.is_some_and(|c| c.is_retryable()) => {}
                Err(failure) => panic!("{failure}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mixed = call(
            &server,
            api::ProduceManyRequest {
                appends: vec![append(0, &["x"]), append(1, &["y"])],
                store_id: 0,
            },
        )
        .await;
        let misrouted = call(
            &server,
            api::ProduceManyRequest {
                appends: vec![append(0, &["z"])],
                store_id: 999,
            },
        )
        .await;
        (accepted, mixed, misrouted)
    });
    let (accepted, mixed, misrouted) = outcomes;
    let results: Vec<(u64, u32)> = accepted
        .expect("accepted once group 0 had a master")
        .iter()
        .map(|r| (r.first_offset, r.count))
        .collect();
    assert_eq!(results, [(1, 2), (3, 1)]);
    let mixed = api::check(mixed.error.as_ref()).expect_err("two groups in one call");
    assert_eq!(mixed.code, Some(ErrorCode::InvalidArgument), "{mixed}");
    let misrouted = api::check(misrouted.error.as_ref()).expect_err("another store");
    assert_eq!(misrouted.code, Some(ErrorCode::WrongStore), "{misrouted}");
    let stored = values_by_queue(&store.consume_all("g1"));
    assert_eq!(
        stored,
        BTreeMap::from([(0, vec!["a".to_string(), "b".to_string(), "c".to_string()])]),
        "only the accepted call was written"
    );
}

#[test]
fn produce_with_a_message_id_twice_stores_one_message_and_reports_the_duplicate() {
    let store = Store::start();
    store.wait_ready();
    let with_id =
        |id: &str, input: &[u8]| store.produce(&["--queue", "2", "--message-id", id], input);
    let first = with_id("order-17", b"once\n");
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        !text(&first.stderr).contains("duplicate"),
        "{}",
        text(&first.stderr)
    );
    let again = with_id("order-17", b"once\n");
    assert!(again.status.success(), "{}", text(&again.stderr));
    let said = text(&again.stderr);
    assert!(
        said.contains("duplicate") && said.contains("stored at q2 offset 1"),
        "{said}"
    );
    assert!(said.contains("0 message(s) acknowledged"), "{said}");
    let other = with_id("order-18", b"other\n");
    assert!(other.status.success(), "{}", text(&other.stderr));
    let values: Vec<(u64, String)> = store
        .consume_all("g1")
        .iter()
        .map(|m| {
            let queue = m["queue"].as_u64().expect("queue");
            (queue, m["value"].as_str().expect("value").to_string())
        })
        .collect();
    assert_eq!(
        values,
        [(2, "once".to_string()), (2, "other".to_string())],
        "one message per id"
    );

    // Bad input: typed errors, nothing stored.
    let two_lines = with_id("order-19", b"a\nb\n");
    assert_eq!(two_lines.status.code(), Some(1));
    assert!(
        text(&two_lines.stderr).contains("one line"),
        "{}",
        text(&two_lines.stderr)
    );
    for bad in [String::new(), "x".repeat(65)] {
        let refused = with_id(&bad, b"bad\n");
        assert_eq!(refused.status.code(), Some(1));
        assert!(
            text(&refused.stderr).contains("INVALID_ARGUMENT"),
            "{}",
            text(&refused.stderr)
        );
    }
    assert!(store.consume_all("g1").is_empty(), "nothing more stored");
}

#[test]
fn producer_dedup_a_retried_message_id_is_answered_with_the_first_offsets_and_stored_once() {
    use phxq_proto::api::{self, phxq_client::PhxqClient};
    use phxq_types::ErrorCode;

    let produce = |id: &[u8], value: &str| api::ProduceRequest {
        store_id: 0,
        topic: "test".to_string(),
        queue: 0,
        message_id: id.to_vec(),
        messages: vec![api::Message {
            key: Vec::new(),
            value: value.as_bytes().to_vec(),
        }],
    };
    let store = Store::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Each request goes to group 0's master, following NOT_MASTER while placement settles.
    let call = |request: api::ProduceRequest| {
        runtime.block_on(async {
            let mut server = store.server(1);
            for _ in 0..100 {
                store.wait_ready();
                let mut client = PhxqClient::connect(format!("http://{server}"))
                    .await
                    .expect("connect");
                let response = client
                    .produce(request.clone())
                    .await
                    .expect("produce")
                    .into_inner();
                match api::check(response.error.as_ref()) {
                    Err(failure) if failure.code == Some(ErrorCode::NotMaster) => {
                        if let Some(master) = failure.master_addr {
                            server = master;
                        }
                    }
                    Err(failure) if failure.code.is_some_and(|c| c.is_retryable()) => {}
                    _ => return response,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("no master for group 0");
        })
    };
    let first = call(produce(b"order-17", "once"));
    assert_eq!(
        api::check(first.error.as_ref()).map_err(|f| f.to_string()),
        Ok(())
    );
    assert!(!first.duplicate);
    let other = call(produce(b"order-18", "other"));
    let retry = call(produce(b"order-17", "once"));
    assert_eq!(
        api::check(retry.error.as_ref()).map_err(|f| f.to_string()),
        Ok(())
    );
    assert_eq!(
        (retry.first_offset, retry.count, retry.duplicate),
        (first.first_offset, first.count, true),
        "a retry is answered like the first attempt"
    );
    assert_eq!(other.first_offset, first.first_offset + 1);

    // Bad input: an id over 64 bytes is refused and stores nothing.
    let too_long = call(produce(&[b'x'; 65], "never"));
    let failure = api::check(too_long.error.as_ref()).expect_err("a 65-byte id is refused");
    assert_eq!(failure.code, Some(ErrorCode::InvalidArgument), "{failure}");

    let values: Vec<String> = store
        .consume_all("g1")
        .iter()
        .map(|m| m["value"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        values,
        ["once", "other"],
        "stored once; the bad request stored nothing"
    );
}

#[test]
fn tail_follows_from_the_end_prints_what_arrives_and_leaves_the_cursor_alone() {
    use std::io::BufRead;

    let store = Store::start();
    store.wait_ready();
    let before = store.produce(&[], b"old-1\nold-2\n");
    assert!(before.status.success(), "{}", text(&before.stderr));

    let server = store.server(1);
    let mut tail = phxq()
        .args([
            "tail", "--server", &server, "--topic", "test", "--group", "g1", "--max", "3", "--json",
        ])
        .env_remove("PHXQ_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn phxq tail");
    // Its first line says it has every queue's end: what is produced after it must come out.
    let mut stderr = std::io::BufReader::new(tail.stderr.take().expect("stderr"));
    let mut first = String::new();
    stderr.read_line(&mut first).expect("tail's first line");
    assert!(first.contains("from their end"), "{first}");

    let after = store.produce(&[], b"new-1\nnew-2\nnew-3\n");
    assert!(after.status.success(), "{}", text(&after.stderr));
    let status = wait_exit(&mut tail, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "tail ends with 0 after --max messages: {status:?}"
    );
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut tail.stdout.take().expect("stdout"), &mut printed)
        .expect("tail's output");
    let mut values: Vec<String> = printed
        .lines()
        .map(|line| {
            let message: Value = serde_json::from_str(line).expect("a JSON line");
            message["value"].as_str().expect("value").to_string()
        })
        .collect();
    values.sort();
    assert_eq!(values, ["new-1", "new-2", "new-3"], "{printed}");

    let consumed = store.consume_all("g1");
    assert_eq!(
        consumed.len(),
        5,
        "tail moved no cursor: g1 still reads everything"
    );
    let refused = run(
        &[
            "tail", "--server", &server, "--topic", "test", "--group", "nobody", "--max", "1",
        ],
        b"",
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("UNKNOWN_CONSUMER_GROUP"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn seek_moves_a_groups_cursor_to_latest_earliest_or_an_offset_and_refuses_past_the_end() {
    let store = Store::start();
    store.wait_ready();
    let produced = store.produce(&["--queue", "1"], b"a\nb\nc\nd\ne\n");
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    let server = store.server(3);
    let seek = |to: &str, queue: Option<&str>| {
        let mut args = vec![
            "seek", "--server", &server, "--topic", "test", "--group", "g1", "--to", to,
        ];
        if let Some(queue) = queue {
            args.extend(["--queue", queue]);
        }
        run(&args, b"")
    };
    let values = |messages: Vec<Value>| -> Vec<String> {
        messages
            .iter()
            .map(|m| m["value"].as_str().expect("value").to_string())
            .collect()
    };

    let latest = seek("latest", None);
    assert!(latest.status.success(), "{}", text(&latest.stderr));
    assert!(
        text(&latest.stdout).contains("queue 1: next 1 -> 6"),
        "{}",
        text(&latest.stdout)
    );
    assert!(
        store.consume_all("g1").is_empty(),
        "latest: nothing left to read"
    );

    assert!(seek("earliest", Some("1")).status.success());
    assert_eq!(values(store.consume_all("g1")), ["a", "b", "c", "d", "e"]);

    assert!(seek("4", Some("1")).status.success());
    let describe = run(
        &[
            "group", "describe", "--server", &server, "--topic", "test", "--group", "g1", "--json",
        ],
        b"",
    );
    assert!(describe.status.success(), "{}", text(&describe.stderr));
    let described: Value = serde_json::from_str(&text(&describe.stdout)).expect("JSON");
    assert_eq!(described["lag"], 2, "{described:#}");
    assert_eq!(
        described["queues"][1],
        serde_json::json!({"queue": 1, "next": 4, "end": 6, "lag": 2, "member": null})
    );
    assert_eq!(values(store.consume_all("g1")), ["d", "e"]);
    let listed = run(&["group", "list", "--server", &server, "--json"], b"");
    let listed: Value = serde_json::from_str(&text(&listed.stdout)).expect("JSON");
    assert_eq!(
        listed,
        serde_json::json!([
            {"group": "audit", "topics": ["test"]},
            {"group": "g1", "topics": ["test"]}
        ])
    );

    let past = seek("7", Some("1"));
    assert_eq!(past.status.code(), Some(1));
    assert!(
        text(&past.stderr).contains("INVALID_ARGUMENT"),
        "{}",
        text(&past.stderr)
    );
    assert!(
        store.consume_all("g1").is_empty(),
        "a refused seek moves nothing"
    );
    // Offset 3 is within queues 0 and 1 but past the end of the empty queues 2 and 3: the
    // seek is refused and moves no queue, not even those checked before the empty ones.
    let more = store.produce(&["--queue", "0"], b"x\ny\nz\n");
    assert!(more.status.success(), "{}", text(&more.stderr));
    let partly = seek("3", None);
    assert_eq!(partly.status.code(), Some(1), "{}", text(&partly.stdout));
    assert_eq!(
        values(store.consume_all("g1")),
        ["x", "y", "z"],
        "a seek refused on one queue moves no queue"
    );
    let bad = seek("0", Some("1"));
    assert_eq!(bad.status.code(), Some(1), "offsets start at 1");
}

/// Wall-clock milliseconds since the Unix epoch (the nodes stamp batches with the same clock).
fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    u64::try_from(since.as_millis()).expect("fits")
}

/// `time_ms` as RFC 3339 (`2024-05-01T12:00:00.250Z`), written by GNU `date`: an oracle
/// independent of the parser under test.
fn rfc3339(time_ms: u64) -> String {
    let at = format!("@{}.{:03}", time_ms / 1000, time_ms % 1000);
    let output = Command::new("date")
        .args(["-u", "-d", &at, "+%Y-%m-%dT%H:%M:%S.%3NZ"])
        .output()
        .expect("run date");
    assert!(output.status.success(), "date: {}", text(&output.stderr));
    text(&output.stdout).trim().to_string()
}

/// Asks the master of the request's queue where it reaches a time, following `NOT_MASTER`
/// and waiting out elections (placement may still move masters); returns the first answer
/// that is neither.
fn offset_for_time(
    store: &Store,
    request: phxq_proto::api::OffsetForTimeRequest,
) -> phxq_proto::api::OffsetForTimeResponse {
    use phxq_proto::api::{self, phxq_client::PhxqClient};
    use phxq_types::ErrorCode;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut server = store.server(1);
    for _ in 0..100 {
        let response = runtime.block_on(async {
            let mut client = PhxqClient::connect(format!("http://{server}"))
                .await
                .expect("connect");
            (client.offset_for_time(request.clone()).await)
                .expect("offset_for_time")
                .into_inner()
        });
        match api::check(response.error.as_ref()) {
            Err(failure) if failure.code == Some(ErrorCode::NotMaster) => {
                server = failure.master_addr.expect("NOT_MASTER names the master");
            }
            Err(failure) if failure.is_retryable() => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => return response,
        }
    }
    panic!("no master answered OffsetForTime");
}

fn time_request(queue: u32, time_ms: u64) -> phxq_proto::api::OffsetForTimeRequest {
    phxq_proto::api::OffsetForTimeRequest {
        topic: "test".to_string(),
        queue,
        time_ms,
        store_id: 0,
    }
}

#[test]
fn seek_by_time_replays_from_the_first_message_of_the_second_burst() {
    let store = Store::start();
    store.wait_ready();
    let burst = |queue: &str, lines: &[u8]| {
        let produced = store.produce(&["--queue", queue], lines);
        assert!(produced.status.success(), "{}", text(&produced.stderr));
    };
    burst("0", b"a-early\n");
    burst("1", b"b-early-1\nb-early-2\n");
    // Batches are stamped with the master's clock at its last tick (50 ms): a wait of several
    // ticks either side of `between` puts it strictly between the bursts' times.
    std::thread::sleep(Duration::from_millis(400));
    let between = now_ms();
    std::thread::sleep(Duration::from_millis(400));
    burst("0", b"a-late\n");
    burst("1", b"b-late-1\nb-late-2\n");

    // Read everything once (g1's cursors go to the ends), and check the bursts' times.
    let all = store.consume_all("g1");
    let time_of = |value: &str| {
        let message = all.iter().find(|m| m["value"] == value).expect(value);
        message["time_ms"].as_u64().expect("time_ms")
    };
    let early = ["a-early", "b-early-1", "b-early-2"].map(time_of);
    let late = ["a-late", "b-late-1", "b-late-2"].map(time_of);
    assert!(
        early.iter().all(|&t| t < between) && late.iter().all(|&t| between <= t),
        "bursts at {early:?} and {late:?}, seek time {between}"
    );
    let (first, last) = (
        early.into_iter().min().unwrap(),
        late.into_iter().max().unwrap(),
    );

    // Through the gRPC API: queue 1 holds offsets 1-2 early, 3-4 late.
    let answer = |time_ms| {
        let response = offset_for_time(&store, time_request(1, time_ms));
        assert_eq!(phxq_proto::api::check(response.error.as_ref()), Ok(()));
        (response.offset, response.end_offset)
    };
    assert_eq!(answer(between), (3, 5), "the first of the second burst");
    assert_eq!(answer(late[1]), (3, 5), "a message's own time finds it");
    assert_eq!(answer(early[2] + 1), (3, 5), "just after the first burst");
    assert_eq!(answer(early[1]), (1, 5));
    assert_eq!(answer(0), (1, 5), "before everything: the oldest retained");
    assert_eq!(answer(last + 1), (5, 5), "after everything: the end");

    // Through the CLI, every queue at once, the time in RFC 3339.
    let server = store.server(3);
    let seek = |to: &str| {
        let output = run(
            &[
                "seek", "--server", &server, "--topic", "test", "--group", "g1", "--to", to,
            ],
            b"",
        );
        assert!(output.status.success(), "{to}: {}", text(&output.stderr));
        text(&output.stdout)
    };
    let moved = seek(&format!("time:{}", rfc3339(between)));
    for line in [
        "queue 0: next 3 -> 2",
        "queue 1: next 5 -> 3",
        "queue 2: next 1 -> 1",
    ] {
        assert!(moved.contains(line), "{line:?} in {moved}");
    }
    let replayed = store.consume_all("g1");
    let first_of = |queue: u64| {
        let message = replayed
            .iter()
            .find(|m| m["queue"] == queue)
            .expect("a message");
        (message["offset"].as_u64(), message["value"].as_str())
    };
    assert_eq!(first_of(0), (Some(2), Some("a-late")));
    assert_eq!(first_of(1), (Some(3), Some("b-late-1")));
    assert_eq!(replayed.len(), 3, "only the second burst: {replayed:?}");

    // A millisecond before everything: the oldest retained message, so all of it again.
    seek(&format!("time:{}", first - 1));
    let values = values_by_queue(&store.consume_all("g1"));
    assert_eq!(values[&0], ["a-early", "a-late"]);
    assert_eq!(
        values[&1],
        ["b-early-1", "b-early-2", "b-late-1", "b-late-2"]
    );

    // After everything: the end, so nothing to read.
    let moved = seek(&format!("time:{}", last + 1));
    assert!(moved.contains("queue 1: next 5 -> 5"), "{moved}");
    assert!(store.consume_all("g1").is_empty());
}

#[test]
fn offset_for_time_and_seek_by_time_refuse_bad_input_and_change_nothing() {
    use phxq_proto::api::{self, phxq_client::PhxqClient};
    use phxq_types::{ErrorCode, TIME_MS_MAX};

    let store = Store::start();
    store.wait_ready();
    let produced = store.produce(&["--queue", "1"], b"kept-1\nkept-2\n");
    assert!(produced.status.success(), "{}", text(&produced.stderr));

    let code_of = |request: api::OffsetForTimeRequest| {
        let response = offset_for_time(&store, request);
        api::check(response.error.as_ref())
            .err()
            .and_then(|f| f.code)
    };
    let mut unknown_topic = time_request(1, 0);
    unknown_topic.topic = "nope".to_string();
    let mut bad_name = time_request(1, 0);
    bad_name.topic = "no spaces".to_string();
    let mut other_store = time_request(1, 0);
    other_store.store_id = 999;
    let refusals = [
        (unknown_topic, ErrorCode::UnknownTopic),
        (bad_name, ErrorCode::InvalidName),
        (time_request(QUEUES, 0), ErrorCode::UnknownQueue),
        (time_request(1, TIME_MS_MAX + 1), ErrorCode::InvalidArgument),
        (time_request(1, u64::MAX), ErrorCode::InvalidArgument),
        (other_store, ErrorCode::WrongStore),
    ];
    for (request, code) in refusals {
        let described = format!("{request:?}");
        assert_eq!(code_of(request), Some(code), "{described}");
    }
    assert_eq!(
        code_of(time_request(1, TIME_MS_MAX)),
        None,
        "the limit itself"
    );

    // A node that is not queue 1's master redirects (placement may move masters: retry).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redirected = (0..20).find_map(|_| {
        let status = store.wait_ready();
        let master = status["groups"][1]["master"].as_u64().unwrap() as usize;
        let other = if master == 1 { 2 } else { 1 };
        let response = runtime.block_on(async {
            let mut client = PhxqClient::connect(format!("http://{}", store.server(other)))
                .await
                .expect("connect");
            (client.offset_for_time(time_request(1, 0)).await)
                .expect("offset_for_time")
                .into_inner()
        });
        let failure = api::check(response.error.as_ref()).err()?;
        (failure.code == Some(ErrorCode::NotMaster)).then_some(failure)
    });
    let failure = redirected.expect("a non-master answered NOT_MASTER");
    let master_addr = failure.master_addr.expect("NOT_MASTER names the master");
    assert!(
        (1..=3).any(|id| store.server(id) == master_addr),
        "{master_addr}"
    );

    let server = store.server(2);
    let seek = |group: &str, to: &str| {
        run(
            &[
                "seek", "--server", &server, "--topic", "test", "--group", group, "--to", to,
            ],
            b"",
        )
    };
    let beyond = format!("time:{}", TIME_MS_MAX + 1);
    for to in [
        "time:",
        "time:yesterday",
        "time:2023-02-29T00:00:00Z",
        "time:2024-05-01T12:00:00",
        "time:1969-12-31T23:59:59Z",
        beyond.as_str(),
    ] {
        let output = seek("g1", to);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{to}: {}",
            text(&output.stdout)
        );
        assert!(
            text(&output.stderr).contains("--to"),
            "{to}: {}",
            text(&output.stderr)
        );
    }
    refused(&seek("nobody", "time:0"), "UNKNOWN_CONSUMER_GROUP(4)");

    let values = values_by_queue(&store.consume_all("g1"));
    assert_eq!(
        values,
        BTreeMap::from([(1, vec!["kept-1".to_string(), "kept-2".to_string()])]),
        "no refused seek moved g1's cursor"
    );
}

#[test]
fn a_config_with_a_bad_key_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    let sample =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../etc/node1.toml"))
            .unwrap();
    std::fs::write(
        &path,
        sample.replace("queues = 8", "queues = 8\nqueue_count = 8"),
    )
    .unwrap();
    refused(
        &run(&["node", "--config", path.to_str().unwrap()], b""),
        "queue_count",
    );
    std::fs::write(&path, sample.replace("lease_ticks = 7", "lease_ticks = 9")).unwrap();
    refused(
        &run(&["node", "--config", path.to_str().unwrap()], b""),
        "timing.lease_ticks",
    );
}

#[test]
fn dev_runs_a_three_node_store_in_one_command_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(6);
    let (client, peer) = (ports[0], ports[3]);
    // Three consecutive ports are needed for each; find a run that is free.
    let (client, peer) = consecutive_free(client, peer);
    let mut dev = phxq()
        .args([
            "dev",
            "--dir",
            dir.path().to_str().unwrap(),
            "--clean",
            "--client-port",
            &client.to_string(),
            "--peer-port",
            &peer.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn phxq dev");
    let stdout = dev.stdout.take().unwrap();
    let (lines, read) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if lines.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let mut printed = Vec::new();
    let deadline = Instant::now() + READY_TIMEOUT;
    while !printed
        .iter()
        .any(|l: &String| l.contains("phxq dev: ready"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match read.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => {
                let _ = dev.kill();
                panic!("phxq dev not ready in time: {printed:#?}");
            }
        }
    }
    let printed = printed.join("\n");
    for expected in [
        "3-node store",
        "node-1",
        "node-3",
        "topic \"test\": 8 queues",
        "g1",
        "phxq produce",
    ] {
        assert!(printed.contains(expected), "{expected:?} in:\n{printed}");
    }

    let server = format!("127.0.0.1:{}", client + 2);
    let produced = run(
        &[
            "produce", "--server", &server, "--topic", "test", "--key", "a",
        ],
        b"one\ntwo\n",
    );
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    let consumed = run(
        &[
            "consume", "--server", &server, "--topic", "test", "--group", "g1", "--json",
        ],
        b"",
    );
    assert!(consumed.status.success(), "{}", text(&consumed.stderr));
    assert_eq!(text(&consumed.stdout).lines().count(), 2);

    terminate(&dev);
    let status = wait_exit(&mut dev, STOP_TIMEOUT);
    let _ = dev.kill();
    assert!(
        status.is_some_and(|s| s.success()),
        "dev exits 0 on SIGTERM: {status:?}"
    );
    let rest: Vec<String> = read.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("stopped cleanly")),
        "{rest:?}"
    );
    for id in 1..=3 {
        assert!(
            dir.path().join(format!("node-{id}/wal")).is_dir(),
            "node {id} has its own data directory"
        );
    }
}

/// Two bases, each with itself and the next two ports free (retrying a few kernel picks).
/// `phxq dev --auth` prints an admin token (and saves it in its directory); `--token` with
/// it works for admin and client commands; without a token, or with a forged one, a
/// command fails (exit 1) saying why and what to pass, and nothing is produced.
/// `phxq dev FLAGS` on free ports in `dir`, and every line it printed until ready.
fn start_dev(dir: &Path, flags: &[&str]) -> (Child, Vec<String>, u16) {
    let ports = free_ports(6);
    let (client, peer) = consecutive_free(ports[0], ports[3]);
    let mut dev = phxq()
        .arg("dev")
        .args(flags)
        .args(["--dir", dir.to_str().unwrap(), "--clean"])
        .args([
            "--client-port",
            &client.to_string(),
            "--peer-port",
            &peer.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn phxq dev");
    let stdout = dev.stdout.take().unwrap();
    let (lines, read) = std::sync::mpsc::channel();
    // Read to the end even once nobody listens: a closed pipe would fail dev's last lines.
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = lines.send(line.unwrap_or_default());
        }
    });
    let mut printed: Vec<String> = Vec::new();
    let deadline = Instant::now() + READY_TIMEOUT;
    while !printed.iter().any(|l| l.contains("phxq dev: ready")) {
        match read.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => printed.push(line),
            Err(_) => {
                let _ = dev.kill();
                panic!("phxq dev not ready in time: {printed:#?}");
            }
        }
    }
    (dev, printed, client)
}

/// The admin token `phxq dev --auth` printed.
fn printed_token(printed: &[String]) -> String {
    let at = printed
        .iter()
        .position(|l| l.contains("admin token"))
        .expect("a token line");
    let token = printed[at + 1].trim().to_string();
    assert!(token.starts_with("phxq1."), "{printed:#?}");
    token
}

#[test]
fn dev_with_auth_prints_an_admin_token_that_works_and_no_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, printed, client) = start_dev(dir.path(), &["--auth"]);
    let token = printed_token(&printed);
    let saved = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    assert_eq!(saved.trim(), token);

    let server = format!("127.0.0.1:{client}");
    let common = ["--server", server.as_str()];
    let produce = |token: Option<&str>| {
        let mut args = vec![
            "produce",
            "--topic",
            "test",
            "--key",
            "a",
            "--timeout-ms",
            "3000",
        ];
        args.extend(common);
        if let Some(token) = token {
            args.extend(["--token", token]);
        }
        run(&args, b"one\n")
    };
    // One signature character changed (not the last: it carries padding bits).
    let at = token.len() - 10;
    let changed = if &token[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{changed}{}", &token[..at], &token[at + 1..]);
    for (what, refused) in [
        ("no token", produce(None)),
        ("forged", produce(Some(&forged))),
        (
            "no token, status",
            run(&["cluster", "status", "--server", &server], b""),
        ),
    ] {
        assert_eq!(refused.status.code(), Some(1), "{what}");
        let said = text(&refused.stderr);
        assert!(said.contains("UNAUTHENTICATED"), "{what}: {said}");
    }
    let status = run(&["cluster", "status", "--server", &server], b"");
    assert!(
        text(&status.stderr).contains("--token"),
        "{}",
        text(&status.stderr)
    );

    let produced = produce(Some(&token));
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    let mut args = vec!["consume", "--topic", "test", "--group", "g1", "--json"];
    args.extend(common);
    args.extend(["--token", token.as_str()]);
    let consumed = run(&args, b"");
    assert!(consumed.status.success(), "{}", text(&consumed.stderr));
    assert_eq!(
        text(&consumed.stdout).lines().count(),
        1,
        "only the admin's line"
    );
    let created = run(
        &[
            "topic", "create", "made", "--queues", "2", "--server", &server, "--token", &token,
        ],
        b"",
    );
    assert!(created.status.success(), "{}", text(&created.stderr));

    terminate(&dev);
    assert!(wait_exit(&mut dev, Duration::from_secs(20)).is_some_and(|s| s.success()));
}

/// `phxq dev --tls --auth` serves its client ports over TLS and prints the CA to pass;
/// `--ca` (or `PHXQ_CA`) with the token works for the CLI and the benchmark client; without
/// it, or with another store's CA, a command fails at once (exit 1) saying what to change,
/// and nothing is produced.
#[test]
fn dev_with_tls_serves_clients_that_pass_its_ca_and_refuses_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, printed, client) = start_dev(dir.path(), &["--tls", "--auth"]);
    let token = printed_token(&printed);
    let ca = dir.path().join("tls/ca.pem");
    let ca = ca.to_str().unwrap();
    assert!(
        printed.iter().any(|l| l.contains(&format!("--ca {ca}"))),
        "{printed:#?}"
    );
    let other = tempfile::tempdir().unwrap();
    let made = run(
        &[
            "cert",
            "ca",
            "--dir",
            other.path().to_str().unwrap(),
            "--store-id",
            "1",
        ],
        b"",
    );
    assert!(made.status.success(), "{}", text(&made.stderr));
    let foreign = other.path().join("ca.pem");
    let server = format!("127.0.0.1:{client}");
    let produce = |ca: Option<&str>| {
        let mut args = vec![
            "produce",
            "--topic",
            "test",
            "--key",
            "a",
            "--timeout-ms",
            "8000",
        ];
        args.extend(["--server", server.as_str(), "--token", token.as_str()]);
        if let Some(ca) = ca {
            args.extend(["--ca", ca]);
        }
        let started = Instant::now();
        let output = run(&args, b"one\n");
        (output, started.elapsed())
    };
    for (what, ca, says) in [
        ("no CA", None, "speaks TLS"),
        ("another store's CA", foreign.to_str(), "not accepted"),
    ] {
        let (refused, took) = produce(ca);
        assert_eq!(refused.status.code(), Some(1), "{what}");
        let said = text(&refused.stderr);
        assert!(said.contains(says), "{what}: {said}");
        assert!(
            took < Duration::from_secs(4),
            "{what}: refused after {took:?}"
        );
    }
    let status = run(
        &["cluster", "status", "--server", &server, "--token", &token],
        b"",
    );
    assert_eq!(status.status.code(), Some(1));
    assert!(
        text(&status.stderr).contains("--ca"),
        "{}",
        text(&status.stderr)
    );

    let (produced, _) = produce(Some(ca));
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    let consumed = phxq()
        .args(["consume", "--topic", "test", "--group", "g1", "--json"])
        .args(["--server", &server, "--token", &token])
        .env("PHXQ_CA", ca)
        .output()
        .expect("run phxq consume");
    assert!(consumed.status.success(), "{}", text(&consumed.stderr));
    assert_eq!(
        text(&consumed.stdout).lines().count(),
        1,
        "only the line sent with the CA"
    );
    let bench = run(
        &[
            "bench",
            "produce",
            "--server",
            &server,
            "--token",
            &token,
            "--ca",
            ca,
            "--producers",
            "2",
            "--stream",
            "--duration-s",
            "0.5",
            "--warmup-s",
            "0",
        ],
        b"",
    );
    assert!(bench.status.success(), "{}", text(&bench.stderr));

    terminate(&dev);
    assert!(wait_exit(&mut dev, Duration::from_secs(20)).is_some_and(|s| s.success()));
}

fn consecutive_free(client: u16, peer: u16) -> (u16, u16) {
    let free = |base: u16| {
        base < u16::MAX - 3
            && (base..base + 3).all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
    };
    if free(client) && free(peer) && client.abs_diff(peer) >= 3 {
        return (client, peer);
    }
    for _ in 0..100 {
        let ports = free_ports(2);
        if free(ports[0]) && free(ports[1]) && ports[0].abs_diff(ports[1]) >= 3 {
            return (ports[0], ports[1]);
        }
    }
    panic!("no run of three free ports found");
}

// ---------------------------------------------------------------------------------------------
// Topics through the API

/// `phxq topic ARGS --server` node `id`'s address.
fn topic(store: &Store, id: usize, args: &[&str]) -> Output {
    let server = store.server(id);
    let mut all = vec!["topic"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--server", &server]);
    run(&all, b"")
}

/// Consumes everything of `topic` for `group` through node `id`: `(queue, offset, value)`.
fn consume_topic(store: &Store, id: usize, topic: &str, group: &str) -> Vec<(u64, u64, String)> {
    let server = store.server(id);
    let output = run(
        &[
            "consume", "--server", &server, "--topic", topic, "--group", group, "--json",
        ],
        b"",
    );
    assert!(output.status.success(), "consume: {}", text(&output.stderr));
    let mut messages: Vec<(u64, u64, String)> = text(&output.stdout)
        .lines()
        .map(|line| {
            let m: Value = serde_json::from_str(line).expect("a JSON line");
            let value = m["value"].as_str().unwrap().to_string();
            (
                m["queue"].as_u64().unwrap(),
                m["offset"].as_u64().unwrap(),
                value,
            )
        })
        .collect();
    messages.sort();
    messages
}

/// Asserts `output` failed with exit 1 and names `code` on stderr.
fn refused_with(output: &Output, code: &str) {
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains(code),
        "expected {code}: {}",
        text(&output.stderr)
    );
}

/// Produces `values` to `topic`/`queue` with one gRPC Produce at that queue's master
/// (following NOT_MASTER), returning the failure if refused.
fn grpc_produce(store: &Store, topic: &str, queue: u32) -> Result<u64, phxq_proto::api::Failure> {
    use phxq_proto::api::{self, phxq_client::PhxqClient};
    use phxq_types::ErrorCode;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut server = store.server(1);
        let request = api::ProduceRequest {
            topic: topic.to_string(),
            queue,
            messages: vec![api::Message {
                key: Vec::new(),
                value: b"grpc".to_vec(),
            }],
            ..Default::default()
        };
        let mut last = None;
        for _ in 0..100 {
            let mut client = PhxqClient::connect(format!("http://{server}"))
                .await
                .expect("connect");
            let response = client
                .produce(request.clone())
                .await
                .expect("produce")
                .into_inner();
            match api::check(response.error.as_ref()) {
                Ok(()) => return Ok(response.first_offset),
                Err(failure) if failure.code == Some(ErrorCode::NotMaster) => {
                    if let Some(master) = failure.master_addr.clone() {
                        server = master;
                    }
                    last = Some(failure);
                }
                Err(failure) if failure.is_retryable() => last = Some(failure),
                Err(failure) => return Err(failure),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last.expect("some answer"))
    })
}

#[test]
fn a_topic_is_created_used_altered_described_and_deleted_through_the_cli_and_grpc() {
    let store = Store::start();
    let created = topic(
        &store,
        1,
        &["create", "events", "--queues", "2", "--groups", "readers"],
    );
    assert!(created.status.success(), "{}", text(&created.stderr));
    assert!(text(&created.stdout).contains("create topic events: done in 6 groups"));
    assert!(
        text(&created.stderr).contains("[6/6]"),
        "progress per group: {}",
        text(&created.stderr)
    );
    // Creating it again is a harmless re-run.
    let again = topic(
        &store,
        2,
        &["create", "events", "--queues", "2", "--groups", "readers"],
    );
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("(no change)"),
        "{}",
        text(&again.stdout)
    );

    let produced = run(
        &["produce", "--server", &store.server(2), "--topic", "events"],
        b"a\nb\nc\n",
    );
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    let read = consume_topic(&store, 3, "events", "readers");
    let values: Vec<&str> = read.iter().map(|(_, _, v)| v.as_str()).collect();
    assert_eq!(values.len(), 3, "{read:?}");
    assert!(
        ["a", "b", "c"].iter().all(|v| values.contains(v)),
        "{read:?}"
    );

    // Grow to 4 queues and add a consumer group; queue 3 exists now.
    let altered = topic(
        &store,
        3,
        &["alter", "events", "--queues", "4", "--add-group", "audit"],
    );
    assert!(altered.status.success(), "{}", text(&altered.stderr));
    let produced = run(
        &[
            "produce",
            "--server",
            &store.server(1),
            "--topic",
            "events",
            "--queue",
            "3",
        ],
        b"d\n",
    );
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    let described = topic(&store, 2, &["describe", "events", "--json"]);
    assert!(described.status.success(), "{}", text(&described.stderr));
    let described: Value = serde_json::from_slice(&described.stdout).expect("describe JSON");
    assert_eq!(described["queues"], 4, "{described}");
    assert_eq!(described["consistent"], true, "{described}");
    assert_eq!(
        described["config"]["consumer_groups"],
        serde_json::json!(["readers", "audit"])
    );
    assert_eq!(described["config"]["dedup_window"], 1000, "the default");
    // Per consumer group settings, replicated with the topic.
    let settings = topic(
        &store,
        1,
        &[
            "alter",
            "events",
            "--settings-for",
            "audit",
            "--retry",
            "3x1s,2x1m",
            "--dead-letter",
            "events.dead",
            "--rate-messages",
            "100",
            "--max-in-flight",
            "8",
        ],
    );
    assert!(settings.status.success(), "{}", text(&settings.stderr));
    let described = topic(&store, 3, &["describe", "events", "--json"]);
    let described: Value = serde_json::from_slice(&described.stdout).expect("describe JSON");
    assert_eq!(
        described["config"]["group_settings"],
        serde_json::json!([{
            "consumer_group": "audit",
            "retry_tiers": [{"attempts": 3, "delay_ms": 1000}, {"attempts": 2, "delay_ms": 60000}],
            "dead_letter_topic": "events.dead",
            "rate_messages_per_s": 100,
            "rate_bytes_per_s": null,
            "max_in_flight": 8,
        }]),
        "{described}"
    );
    let bad_limit = [
        "alter",
        "events",
        "--settings-for",
        "audit",
        "--max-in-flight",
        "0",
    ];
    refused_with(&topic(&store, 1, &bad_limit), "INVALID_ARGUMENT");
    let stranger = [
        "alter",
        "events",
        "--settings-for",
        "nobody",
        "--rate-messages",
        "5",
    ];
    refused_with(&topic(&store, 1, &stranger), "INVALID_ARGUMENT");
    // The new group starts at the oldest message; the old one only sees what is new to it.
    assert_eq!(consume_topic(&store, 1, "events", "audit").len(), 4);
    assert_eq!(
        consume_topic(&store, 1, "events", "readers"),
        [(3, 1, "d".to_string())]
    );
    let status = store.status(3).expect("status");
    let listed: Vec<(&str, u64)> = status["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["queues"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [("events", 4), ("test", QUEUES.into())],
        "cluster status"
    );

    // Bad input: typed errors, nothing changed.
    refused_with(
        &topic(&store, 1, &["create", "events", "--queues", "8"]),
        "TOPIC_EXISTS",
    );
    refused_with(
        &topic(&store, 1, &["alter", "events", "--queues", "3"]),
        "INVALID_ARGUMENT",
    );
    refused_with(
        &topic(&store, 1, &["create", "bad name", "--queues", "1"]),
        "INVALID_NAME",
    );
    refused_with(
        &topic(&store, 1, &["create", "t0", "--queues", "0"]),
        "INVALID_ARGUMENT",
    );
    refused_with(
        &topic(&store, 1, &["create", "t0", "--queues", "5000"]),
        "INVALID_ARGUMENT",
    );
    refused_with(
        &topic(
            &store,
            1,
            &["create", "t0", "--queues", "1", "--max-bytes", "0"],
        ),
        "INVALID_ARGUMENT",
    );
    refused_with(
        &topic(&store, 1, &["alter", "nope", "--queues", "3"]),
        "UNKNOWN_TOPIC",
    );
    refused_with(&topic(&store, 1, &["delete", "nope"]), "UNKNOWN_TOPIC");
    let listed = topic(&store, 2, &["list", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("list JSON");
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topic"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["events", "test"], "no refused topic was created");

    let deleted = topic(&store, 2, &["delete", "events"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    refused_with(&topic(&store, 3, &["describe", "events"]), "UNKNOWN_TOPIC");
    let refusal = grpc_produce(&store, "events", 0).expect_err("the topic is gone");
    assert_eq!(
        refusal.code,
        Some(phxq_types::ErrorCode::UnknownTopic),
        "{refusal}"
    );
    refused_with(
        &run(
            &["produce", "--server", &store.server(1), "--topic", "events"],
            b"x\n",
        ),
        "UNKNOWN_TOPIC",
    );
    assert_eq!(
        grpc_produce(&store, "test", 0),
        Ok(1),
        "other topics are served"
    );
}

#[test]
fn topics_created_through_the_api_survive_a_restart_of_every_node_from_snapshots() {
    // Compact as soon as anything is deletable, so the restart starts from snapshots.
    let mut store =
        Store::start_with("\n[limits]\ncompact_entries_min = 1\n\n[timing]\ncompact_ticks = 2\n");
    let created = topic(
        &store,
        1,
        &[
            "create",
            "kept",
            "--queues",
            "3",
            "--groups",
            "r",
            "--replay-count",
            "0",
            "--replay-age",
            "0",
        ],
    );
    assert!(created.status.success(), "{}", text(&created.stderr));
    let produced = run(
        &["produce", "--server", &store.server(1), "--topic", "kept"],
        b"1\n2\n3\n",
    );
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    assert_eq!(consume_topic(&store, 2, "kept", "r").len(), 3);
    let deleted = topic(&store, 1, &["delete", "test"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));

    // Every node compacted (at least once) behind the change.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + READY_TIMEOUT;
    for id in 1..=3 {
        loop {
            let compactions = runtime.block_on(async {
                use phxq_proto::api::{self, phxq_client::PhxqClient};
                let mut client = PhxqClient::connect(format!("http://{}", store.server(id)))
                    .await
                    .ok()?;
                let status = client
                    .cluster_status(api::ClusterStatusRequest {})
                    .await
                    .ok()?;
                Some(status.into_inner().counters?.compactions)
            });
            if compactions.is_some_and(|c| c >= 6) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not compact: {compactions:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    for id in 1..=3 {
        let mut node = store.nodes[id - 1].take().expect("node");
        terminate(&node);
        let status = wait_exit(&mut node, STOP_TIMEOUT).expect("stops after SIGTERM");
        assert!(status.success(), "{}", store.log(id));
    }
    for id in 1..=3 {
        store.nodes[id - 1] = Some(store.spawn(id));
    }
    store.wait_ready();
    for id in 1..=3 {
        let described = topic(&store, id, &["describe", "kept", "--json"]);
        assert!(
            described.status.success(),
            "node {id}: {}",
            text(&described.stderr)
        );
        let described: Value = serde_json::from_slice(&described.stdout).unwrap();
        assert_eq!(described["queues"], 3);
        assert_eq!(described["consistent"], true, "node {id}: {described}");
        refused_with(&topic(&store, id, &["describe", "test"]), "UNKNOWN_TOPIC");
    }
    let produced = run(
        &[
            "produce",
            "--server",
            &store.server(3),
            "--topic",
            "kept",
            "--queue",
            "1",
        ],
        b"4\n",
    );
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    let after: Vec<String> = consume_topic(&store, 1, "kept", "r")
        .into_iter()
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(
        after,
        ["4"],
        "the cursors survived too: nothing is read twice"
    );
}

/// `--store` for `store`: NAME=its three nodes@WEIGHT.
fn store_flag(name: &str, store: &Store, weight: u32) -> String {
    let servers: Vec<String> = (1..=3).map(|id| store.server(id)).collect();
    format!("{name}={}@{weight}", servers.join(","))
}

#[test]
fn produce_to_two_stores_puts_each_key_in_its_hashed_store_and_spreads_lines_by_weight() {
    use phxq_client::{StoreWeight, store_of_key};

    let stores = [Store::start(), Store::start()];
    let flags = [
        store_flag("a", &stores[0], 1),
        store_flag("b", &stores[1], 3),
    ];
    let produce = |extra: &[&str], input: &[u8]| {
        let mut args = vec![
            "produce", "--topic", "test", "--store", &flags[0], "--store", &flags[1],
        ];
        args.extend_from_slice(extra);
        run(&args, input)
    };
    let weights = [
        StoreWeight {
            name: "a",
            weight: 1,
        },
        StoreWeight {
            name: "b",
            weight: 3,
        },
    ];
    // One key of each store.
    let key_of = |store: usize| {
        (0..)
            .map(|i| format!("user-{i}"))
            .find(|key| store_of_key(&weights, key.as_bytes()) == store)
            .expect("some key")
    };
    let keys = [key_of(0), key_of(1)];

    let lines: String = (1..=400).map(|i| format!("m{i:03}\n")).collect();
    let produced = produce(&[], lines.as_bytes());
    let said = text(&produced.stderr);
    assert!(produced.status.success(), "{said}");
    assert!(
        said.contains("400 message(s) acknowledged")
            && said.contains("a/q")
            && said.contains("b/q"),
        "{said}"
    );
    for (store, key) in keys.iter().enumerate() {
        let input: String = (1..=20).map(|i| format!("{key}/{i:02}\n")).collect();
        let produced = produce(&["--key", key], input.as_bytes());
        assert!(produced.status.success(), "{}", text(&produced.stderr));
        let flag = ["a/q", "b/q"][store];
        assert!(
            text(&produced.stderr).contains(flag),
            "{}",
            text(&produced.stderr)
        );
    }

    let consumed = [stores[0].consume_all("g1"), stores[1].consume_all("g1")];
    let mut unkeyed = Vec::new();
    for (store, messages) in consumed.iter().enumerate() {
        let queues = values_by_queue(messages);
        for values in queues.values() {
            let plain: Vec<&String> = values.iter().filter(|v| v.starts_with('m')).collect();
            assert!(plain.windows(2).all(|w| w[0] < w[1]), "{plain:?}");
            unkeyed.extend(plain.into_iter().map(|v| (store, v.clone())));
        }
        // The key of this store: all its lines here, in one queue, in order; the other
        // store's key: none.
        let keyed: Vec<(u64, String)> = messages
            .iter()
            .filter(|m| m["key"].as_str().is_some_and(|k| !k.is_empty()))
            .map(|m| {
                (
                    m["queue"].as_u64().unwrap(),
                    m["value"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let expected: Vec<String> = (1..=20)
            .map(|i| format!("{}/{i:02}", keys[store]))
            .collect();
        assert_eq!(
            keyed.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
            expected,
            "store {store}"
        );
        assert!(
            keyed.iter().all(|(q, _)| *q == keyed[0].0),
            "one queue per key"
        );
    }
    unkeyed.sort_by(|x, y| x.1.cmp(&y.1));
    let expected: Vec<String> = (1..=400).map(|i| format!("m{i:03}")).collect();
    assert_eq!(
        unkeyed.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        expected,
        "every line once, in one store"
    );
    let in_b = unkeyed.iter().filter(|(store, _)| *store == 1).count() as f64 / 400.0;
    assert!((in_b - 0.75).abs() < 0.1, "store b has {in_b} of the lines");

    // Bad stores: a typed error, a non-zero exit, nothing stored.
    let server = stores[0].server(1);
    for bad in [
        vec!["--store", "c=127.0.0.1:1@0"],
        vec!["--store", "a=127.0.0.1:1@2"],
        vec!["--store", "c=127.0.0.1:1@1001"],
        vec!["--queue", "1"],
        vec!["--store-change-retry", "--server", &server],
    ] {
        let output = if bad[0] == "--store-change-retry" {
            run(
                &["produce", "--topic", "test", bad[0], bad[1], bad[2]],
                b"x\n",
            )
        } else {
            produce(&bad, b"x\n")
        };
        assert_eq!(
            output.status.code(),
            Some(1),
            "{bad:?}: {}",
            text(&output.stderr)
        );
    }
    let malformed = produce(&["--store", "no-equals"], b"x\n");
    refused(&malformed, "no '='");
    assert!(stores[0].consume_all("audit").len() + stores[1].consume_all("audit").len() == 440);
}

#[test]
fn produce_with_an_id_prefix_run_again_after_a_crash_stores_no_line_twice() {
    let store = Store::start();
    let lines = |count: usize| -> String { (1..=count).map(|i| format!("line-{i}\n")).collect() };
    // The first run "crashed" after 30 of the 50 lines.
    let first = store.produce(&["--id-prefix", "import-7"], lines(30).as_bytes());
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        !text(&first.stderr).contains("duplicate"),
        "{}",
        text(&first.stderr)
    );
    let again = store.produce(&["--id-prefix", "import-7"], lines(50).as_bytes());
    let said = text(&again.stderr);
    assert!(again.status.success(), "{said}");
    assert!(
        said.contains("20 message(s) acknowledged") && said.contains("30 duplicate(s)"),
        "{said}"
    );
    assert!(
        said.contains("line 1 (message id \"import-7-1\") is a duplicate")
            && said.contains(" offset "),
        "{said}"
    );
    let third = store.produce(&["--id-prefix", "import-7"], lines(50).as_bytes());
    assert!(
        text(&third.stderr).contains("0 message(s) acknowledged"),
        "{}",
        text(&third.stderr)
    );
    // Another prefix is another set of ids.
    let other = store.produce(&["--id-prefix", "import-8"], lines(2).as_bytes());
    assert!(
        text(&other.stderr).contains("2 message(s) acknowledged"),
        "{}",
        text(&other.stderr)
    );

    let mut values: Vec<String> = store
        .consume_all("g1")
        .iter()
        .map(|m| m["value"].as_str().expect("value").to_string())
        .collect();
    values.sort();
    let mut expected: Vec<String> = (1..=50).map(|i| format!("line-{i}")).collect();
    expected.extend(["line-1".to_string(), "line-2".to_string()]);
    expected.sort();
    assert_eq!(
        values, expected,
        "every line of import-7 once, import-8's two"
    );

    // Bad prefixes and combinations: typed errors, nothing stored.
    for bad in [
        vec!["--id-prefix", ""],
        vec!["--id-prefix", &"p".repeat(44)],
        vec!["--id-prefix", "x", "--message-id", "y"],
        vec!["--id-prefix", "x", "--queue", "1"],
    ] {
        let output = store.produce(&bad, b"bad\n");
        assert_eq!(
            output.status.code(),
            Some(1),
            "{bad:?}: {}",
            text(&output.stderr)
        );
    }
    assert!(store.consume_all("g1").is_empty(), "nothing more stored");
}

#[test]
fn receive_prints_delivery_counts_ack_moves_the_cursor_and_unacked_messages_come_back() {
    let store = Store::start();
    let produced = store.produce(&["--queue", "2"], b"m1\nm2\n");
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    let server = store.server(1);
    let receive = |ack_timeout_ms: &str, wait_ms: &str| {
        let args = [
            "receive",
            "--server",
            &server,
            "--topic",
            "test",
            "--group",
            "g1",
            "--queue",
            "2",
            "--ack-timeout-ms",
            ack_timeout_ms,
            "--wait-ms",
            wait_ms,
            "--json",
        ];
        let output = run(&args, b"");
        assert!(output.status.success(), "receive: {}", text(&output.stderr));
        text(&output.stdout)
            .lines()
            .map(|line| {
                let m: Value = serde_json::from_str(line).expect("a JSON line");
                (
                    m["offset"].as_u64().unwrap(),
                    m["value"].as_str().unwrap().to_string(),
                    m["delivery_count"].as_u64().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let deliver = |verb: &str, offsets: &[&str], extra: &[&str]| {
        let mut args = vec![
            verb, "--server", &server, "--topic", "test", "--group", "g1", "--queue", "2",
        ];
        args.extend_from_slice(offsets);
        args.extend_from_slice(extra);
        run(&args, b"")
    };
    assert_eq!(
        receive("500", "2000"),
        [(1, "m1".to_string(), 1), (2, "m2".to_string(), 1)]
    );
    let acked = deliver("ack", &["2"], &["--json"]);
    assert!(acked.status.success(), "{}", text(&acked.stderr));
    assert_eq!(
        serde_json::from_str::<Value>(&text(&acked.stdout)).expect("JSON"),
        serde_json::json!({"queue": 2, "cursor": 1}),
        "1 still in flight"
    );
    // Offset 1 was not acked: it comes back, counted twice.
    assert_eq!(receive("60000", "5000"), [(1, "m1".to_string(), 2)]);
    let nacked = deliver("nack", &["1"], &["--delay-ms", "0"]);
    assert!(nacked.status.success(), "{}", text(&nacked.stderr));
    assert_eq!(receive("60000", "5000"), [(1, "m1".to_string(), 3)]);
    let acked = deliver("ack", &["1"], &[]);
    assert!(acked.status.success(), "{}", text(&acked.stderr));
    assert!(
        text(&acked.stdout).contains("cursor 3"),
        "{}",
        text(&acked.stdout)
    );
    // The cursor is the group's: consume reads nothing more, the other group everything.
    assert!(store.consume_all("g1").is_empty());
    assert_eq!(store.consume_all("audit").len(), 2);
    // Bad input: typed errors, non-zero exits.
    refused_with(&deliver("ack", &["3"], &[]), "INVALID_ARGUMENT");
    refused_with(&deliver("nack", &["1"], &[]), "INVALID_ARGUMENT");
    refused_with(
        &deliver("ack", &["1"], &["--delay-ms", "5"]),
        "--delay-ms is for nack",
    );
    let zero_timeout = run(
        &[
            "receive",
            "--server",
            &server,
            "--topic",
            "test",
            "--group",
            "g1",
            "--ack-timeout-ms",
            "0",
        ],
        b"",
    );
    refused_with(&zero_timeout, "INVALID_ARGUMENT");
    let stranger = run(
        &[
            "receive", "--server", &server, "--topic", "test", "--group", "nobody",
        ],
        b"",
    );
    refused_with(&stranger, "UNKNOWN_CONSUMER_GROUP");
    let long_wait = run(
        &[
            "receive",
            "--server",
            &server,
            "--topic",
            "test",
            "--group",
            "g1",
            "--wait-ms",
            "60001",
        ],
        b"",
    );
    refused_with(&long_wait, "INVALID_ARGUMENT");
}

// ---------------------------------------------------------------------------------------------
// A node that lost its disk (ARCHITECTURE, "the data directory's history"; README, "A node
// that lost its disk").

/// Every group's applied index as node `id` sees it, or `None` if it does not answer.
fn applied_indexes(
    runtime: &tokio::runtime::Runtime,
    store: &Store,
    id: usize,
) -> Option<Vec<u64>> {
    runtime.block_on(async {
        use phxq_proto::api::{self, phxq_client::PhxqClient};
        let mut client = PhxqClient::connect(format!("http://{}", store.server(id)))
            .await
            .ok()?;
        let status = client
            .cluster_status(api::ClusterStatusRequest {})
            .await
            .ok()?
            .into_inner();
        Some(status.groups.iter().map(|g| g.applied_index).collect())
    })
}

impl Store {
    /// Node `id` started with more arguments (`--rejoin-empty`).
    fn spawn_with(&self, id: usize, extra: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{id}.log")))
            .expect("log file");
        phxq()
            .args(["node", "--config", self.config_path(id).to_str().unwrap()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn phxq node")
    }

    fn data_dir(&self, id: usize) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// Stops node `id` with SIGTERM and waits for a clean exit.
    fn stop(&mut self, id: usize) {
        let mut node = self.nodes[id - 1].take().expect("node running");
        terminate(&node);
        let status = wait_exit(&mut node, STOP_TIMEOUT).expect("stops after SIGTERM");
        assert!(status.success(), "node {id}: {status:?}\n{}", self.log(id));
    }

    /// Starts node `id` and expects it to exit non-zero on its own, saying `expected`.
    fn refused_start(&self, id: usize, expected: &str) {
        let before = self.log(id).len();
        let mut node = self.spawn(id);
        let status = wait_exit(&mut node, READY_TIMEOUT).unwrap_or_else(|| {
            let _ = node.kill();
            panic!("node {id} kept running:\n{}", self.log(id))
        });
        let log = self.log(id)[before..].to_string();
        assert!(!status.success(), "node {id} must fail: {log}");
        assert!(
            log.contains(expected),
            "node {id} must say {expected:?}:\n{log}"
        );
    }
}

/// Produces `count` keyless lines `PREFIX-i` through node 2; returns them.
fn produce_lines(store: &Store, prefix: &str, count: usize) -> Vec<String> {
    let lines: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    let input = lines.join("\n") + "\n";
    let produced = store.produce(&[], input.as_bytes());
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    lines
}

/// Node 3 rejoined with `--rejoin-empty`: once it applied what node 1 applied in every group,
/// every acknowledged line is consumable with node 1 stopped (node 3 and node 2 serve) and
/// again with node 2 stopped (node 3 and node 1 serve): node 3 holds the acknowledged log.
fn check_rejoined(store: &mut Store, acknowledged: &[String]) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let (three, one) = (
            applied_indexes(&runtime, store, 3),
            applied_indexes(&runtime, store, 1),
        );
        if three.is_some() && three == one {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 did not catch up: {three:?} vs {one:?}\n{}",
            store.log(3)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut expected = acknowledged.to_vec();
    expected.sort();
    for (stopped, group) in [(1, "g1"), (2, "audit")] {
        store.stop(stopped);
        let mut values: Vec<String> = store
            .consume_all(group)
            .iter()
            .map(|m| m["value"].as_str().unwrap().to_string())
            .collect();
        values.sort();
        assert_eq!(values, expected, "with node {stopped} stopped");
        store.nodes[stopped - 1] = Some(store.spawn(stopped));
        store.wait_ready();
    }
}

#[test]
fn a_node_whose_wal_was_wiped_refuses_to_start_and_rejoins_only_with_rejoin_empty() {
    let mut store = Store::start();
    let mut acknowledged = produce_lines(&store, "before", 40);
    store.stop(3);
    std::fs::remove_dir_all(store.data_dir(3).join("wal")).unwrap();
    store.refused_start(3, "--rejoin-empty");
    assert!(
        store.log(3).contains("INITIALIZED records term"),
        "{}",
        store.log(3)
    );
    assert!(
        !store.data_dir(3).join("wal").exists(),
        "a refused start creates no empty log"
    );
    acknowledged.extend(produce_lines(&store, "down", 20));

    store.nodes[2] = Some(store.spawn_with(3, &["--rejoin-empty"]));
    acknowledged.extend(produce_lines(&store, "rejoining", 20));
    check_rejoined(&mut store, &acknowledged);
}

#[test]
fn a_node_whose_log_repair_cut_votes_again_only_after_rejoin_empty_caught_up() {
    let mut store = Store::start();
    let mut acknowledged = produce_lines(&store, "before", 40);
    store.stop(3);
    // What `phxq wal repair` writes when it cut a group (tests/cli.rs checks that it does).
    let rejoin = store.data_dir(3).join("REJOIN_REQUIRED");
    std::fs::write(
        &rejoin,
        "`phxq wal repair` cut this node's log: g0 at index 1\n",
    )
    .unwrap();
    store.refused_start(3, "g0 at index 1");
    assert!(store.log(3).contains("--rejoin-empty"), "{}", store.log(3));

    store.nodes[2] = Some(store.spawn_with(3, &["--rejoin-empty"]));
    acknowledged.extend(produce_lines(&store, "rejoining", 20));
    let deadline = Instant::now() + READY_TIMEOUT;
    while rejoin.exists() {
        assert!(
            Instant::now() < deadline,
            "REJOIN_REQUIRED outlived the catch-up:\n{}",
            store.log(3)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Caught up: a plain start is a plain start again.
    store.stop(3);
    store.nodes[2] = Some(store.spawn(3));
    store.wait_ready();
    check_rejoined(&mut store, &acknowledged);
}

#[test]
fn a_wiped_data_dir_stops_at_its_masters_first_heartbeat_and_rejoins_with_rejoin_empty() {
    let mut store = Store::start();
    let mut acknowledged = produce_lines(&store, "before", 40);
    store.stop(3);
    std::fs::remove_dir_all(store.data_dir(3)).unwrap();
    // It looks new to itself; the masters remember it.
    store.refused_start(3, "lost entries it acknowledged");
    assert!(store.log(3).contains("--rejoin-empty"), "{}", store.log(3));
    acknowledged.extend(produce_lines(&store, "down", 20));

    store.nodes[2] = Some(store.spawn_with(3, &["--rejoin-empty"]));
    acknowledged.extend(produce_lines(&store, "rejoining", 20));
    check_rejoined(&mut store, &acknowledged);
}
