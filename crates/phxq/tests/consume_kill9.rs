//! Two `phxq consume --member` processes share consumer group `g1` of a `phxq dev` store; one
//! is killed with SIGKILL while it prints. The other must take over its queues once its
//! session has timed out, not before, and every message must be printed at least once, the
//! killed member's uncommitted ones again.
//!
//! Both consumers write to one pipe, so the lines read back are in the order they were
//! written: a total order of the two processes' prints, without comparing clocks. A queue's
//! lines must come from the first member and then from the second, never interleaved.
//! Every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long the store may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the test waits for each thing it expects of the consumers.
const WAIT: Duration = Duration::from_secs(20);
/// The members' session timeout: the coordinator drops a killed member this long after its
/// last heartbeat arrived.
const SESSION_TIMEOUT_MS: u64 = 2_000;
/// Messages produced (keyless: round-robin over the topic's 8 queues).
const MESSAGES: usize = 240;
/// The group's rate in the store, shared by its live members: slow enough that a member is
/// always in the middle of its queues when it is killed.
const GROUP_RATE: u32 = 40;

fn phxq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_phxq"))
}

fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Two bases, each with itself and the next two ports free (retrying a few kernel picks).
fn consecutive_free() -> (u16, u16) {
    let free = |base: u16| {
        base < u16::MAX - 3
            && (base..base + 3).all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
    };
    for _ in 0..100 {
        let ports = free_ports(2);
        if free(ports[0]) && free(ports[1]) && ports[0].abs_diff(ports[1]) >= 3 {
            return (ports[0], ports[1]);
        }
    }
    panic!("no run of three free ports found");
}

/// Kills every child when dropped (a failed assertion leaves no process behind).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `phxq dev` on free ports and waits until it is ready; returns its first client
/// address.
fn start_dev(dir: &std::path::Path, children: &mut Children) -> String {
    let (client, peer) = consecutive_free();
    let mut dev = phxq()
        .args([
            "dev",
            "--dir",
            dir.to_str().expect("utf-8 path"),
            "--clean",
            "--client-port",
            &client.to_string(),
            "--peer-port",
            &peer.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn phxq dev");
    let stdout = dev.stdout.take().expect("stdout");
    children.0.push(dev);
    let (lines, read) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = read.recv_timeout(left).expect("phxq dev ready in time");
        if line.contains("phxq dev: ready") {
            // Keep draining its output so it never blocks on a full pipe.
            std::thread::spawn(move || while read.recv().is_ok() {});
            return format!("127.0.0.1:{client}");
        }
    }
}

/// Runs a CLI command to success.
fn run_ok(args: &[&str], input: &[u8]) {
    use std::io::Write;
    let mut child = phxq()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn phxq");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    let output = child.wait_with_output().expect("wait");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One printed line: who printed it, where from, and when the test read it.
#[derive(Clone, Debug)]
struct Printed {
    member: String,
    queue: u64,
    offset: u64,
    value: String,
    read_at: Instant,
}

/// Starts `phxq consume --member member` writing to `out`.
fn start_member(server: &str, member: &str, out: &std::io::PipeWriter) -> Child {
    phxq()
        .args([
            "consume",
            "--server",
            server,
            "--topic",
            "test",
            "--group",
            "g1",
            "--member",
            member,
            "--session-timeout-ms",
            &SESSION_TIMEOUT_MS.to_string(),
            "--json",
        ])
        .stdout(out.try_clone().expect("clone the pipe"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn phxq consume")
}

/// Lines read so far, plus those that arrive within `wait` until `done` holds of them.
fn read_until(
    lines: &mpsc::Receiver<Printed>,
    printed: &mut Vec<Printed>,
    what: &str,
    done: impl Fn(&[Printed]) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !done(printed) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => panic!(
                "timed out waiting for {what}; {} lines: {:?}",
                printed.len(),
                printed
                    .iter()
                    .map(|p| (&p.member, p.queue, p.offset))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

/// Where `line` is in `printed`.
fn late_index(printed: &[Printed], line: &Printed) -> usize {
    printed
        .iter()
        .position(|p| std::ptr::eq(p, line))
        .expect("a line of printed")
}

fn count_of(printed: &[Printed], member: &str) -> usize {
    printed.iter().filter(|p| p.member == member).count()
}

#[test]
fn a_consumer_killed_mid_batch_has_its_queues_taken_over_after_its_session_and_nothing_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut children = Children(Vec::new());
    let server = start_dev(dir.path(), &mut children);
    run_ok(
        &[
            "topic",
            "alter",
            "test",
            "--settings-for",
            "g1",
            "--rate-messages",
            &GROUP_RATE.to_string(),
            "--server",
            &server,
        ],
        b"",
    );
    let values: Vec<String> = (0..MESSAGES).map(|i| format!("m{i:03}")).collect();
    let input: String = values.iter().map(|v| format!("{v}\n")).collect();
    run_ok(
        &["produce", "--server", &server, "--topic", "test"],
        input.as_bytes(),
    );

    let (reader, writer) = std::io::pipe().expect("pipe");
    let (sender, lines) = mpsc::channel();
    let reading = std::thread::spawn(move || {
        for line in std::io::BufReader::new(reader).lines() {
            let line = line.expect("a line");
            let json: Value = serde_json::from_str(&line).expect("a JSON line");
            let printed = Printed {
                member: json["member"].as_str().expect("member").to_string(),
                queue: json["queue"].as_u64().expect("queue"),
                offset: json["offset"].as_u64().expect("offset"),
                value: json["value"].as_str().expect("value").to_string(),
                read_at: Instant::now(),
            };
            if sender.send(printed).is_err() {
                return;
            }
        }
    });
    let mut printed = Vec::new();
    let a = start_member(&server, "a", &writer);
    let a_pid = a.id();
    children.0.push(a);
    read_until(&lines, &mut printed, "a's first lines", |p| {
        count_of(p, "a") >= 10
    });
    let b = start_member(&server, "b", &writer);
    children.0.push(b);
    drop(writer); // the consumers hold the only write ends now
    read_until(&lines, &mut printed, "b's first lines", |p| {
        count_of(p, "b") >= 5
    });
    let a_before = count_of(&printed, "a");
    let late_from = printed.len();
    read_until(&lines, &mut printed, "a still printing", |p| {
        count_of(p, "a") >= a_before + 3
    });

    // SIGKILL a while it prints: no drain, no commit, no leaving heartbeat.
    let killed = children
        .0
        .iter_mut()
        .find(|child| child.id() == a_pid)
        .expect("a");
    killed.kill().expect("kill -9");
    killed.wait().expect("reaped");
    let killed_at = Instant::now();
    read_until(&lines, &mut printed, "every message", |p| {
        let seen: BTreeSet<&str> = p.iter().map(|p| p.value.as_str()).collect();
        seen.len() == MESSAGES
    });
    // b drains on SIGTERM and exits 0; the pipe then ends.
    let b = children.0.last_mut().expect("b");
    let status = Command::new("kill")
        .args(["-TERM", &b.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    assert!(
        b.wait().expect("b exits").success(),
        "b exits 0 after SIGTERM"
    );
    drop(lines);
    reading.join().expect("reader");

    let values_seen: BTreeSet<&str> = printed.iter().map(|p| p.value.as_str()).collect();
    let expected: BTreeSet<&str> = values.iter().map(String::as_str).collect();
    assert_eq!(values_seen, expected, "every message printed at least once");

    let mut by_queue: BTreeMap<u64, Vec<&Printed>> = BTreeMap::new();
    for line in &printed {
        by_queue.entry(line.queue).or_default().push(line);
    }
    let mut taken_over = 0;
    for (queue, lines) in &by_queue {
        // a first, then b: the pipe's order is the order of the prints.
        let first_b = lines.iter().position(|p| p.member == "b");
        if let Some(first_b) = first_b {
            assert!(
                lines[first_b..].iter().all(|p| p.member == "b"),
                "queue {queue} printed by a after b started on it: {:?}",
                lines
                    .iter()
                    .map(|p| (&p.member, p.offset))
                    .collect::<Vec<_>>()
            );
        }
        // Each member prints a queue in offset order, densely; b starts where a's commit was,
        // at or before a's last line plus one: nothing skipped.
        for member in ["a", "b"] {
            let offsets: Vec<u64> = lines
                .iter()
                .filter(|p| p.member == member)
                .map(|p| p.offset)
                .collect();
            assert!(
                offsets.windows(2).all(|w| w[1] == w[0] + 1),
                "queue {queue}, member {member}: {offsets:?}"
            );
        }
        let last_a = lines.iter().rev().find(|p| p.member == "a");
        if let (Some(last_a), Some(first_b)) = (last_a, first_b.map(|i| lines[i])) {
            assert!(
                first_b.offset <= last_a.offset + 1,
                "queue {queue}: b started at {} after a printed up to {}",
                first_b.offset,
                last_a.offset
            );
            // Queues a printed just before the kill and b never printed before it: a's.
            let a_late = lines
                .iter()
                .any(|p| p.member == "a" && late_index(&printed, p) >= late_from);
            if a_late && first_b.read_at > killed_at {
                // Taken over from the killed member: only once its session timed out.
                taken_over += 1;
                let after = first_b.read_at - killed_at;
                assert!(
                    after >= Duration::from_millis(SESSION_TIMEOUT_MS / 2),
                    "queue {queue} taken over {after:?} after the kill"
                );
            }
        }
    }
    assert!(taken_over > 0, "a held queues when it was killed");
}
