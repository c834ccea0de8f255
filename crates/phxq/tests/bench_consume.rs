//! `phxq bench consume` against a real store (`phxq dev` on ports the kernel found free):
//! every message produced is consumed exactly once, none is missing, the end-to-end and
//! produce-ack latency figures are in the final JSON line, and what the queues held before
//! the run is skipped. Bad options are refused before anything runs. `phxq bench produce
//! --stream` stores what it counts as acknowledged. Every wait is bounded.

use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long `phxq dev` may take to elect a master for every group.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn phxq() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_phxq"));
    command.env_remove("PHXQ_SERVER");
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `phxq dev` in a temporary directory; killed when dropped.
struct Dev {
    child: Child,
    server: String,
    _dir: tempfile::TempDir,
}

impl Dev {
    /// Starts `phxq dev` and waits until it says every group has a master.
    fn start() -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = three_free_ports_twice();
        let mut child = phxq()
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
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn phxq dev");
        let stdout = child.stdout.take().expect("stdout");
        let (lines, read) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                if lines.send(line.unwrap_or_default()).is_err() {
                    return;
                }
            }
        });
        let dev = Dev {
            child,
            server: format!("127.0.0.1:{client}"),
            _dir: dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut printed = Vec::new();
        while !printed
            .iter()
            .any(|l: &String| l.contains("phxq dev: ready"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match read.recv_timeout(left) {
                Ok(line) => printed.push(line),
                Err(_) => panic!("phxq dev not ready in time: {printed:#?}"),
            }
        }
        dev
    }

    fn run(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = phxq()
            .args(args)
            .args(["--server", &self.server])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run phxq");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
        child.wait_with_output().expect("wait for phxq")
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two bases, each with itself and the next two ports free, three apart at least.
fn three_free_ports_twice() -> (u16, u16) {
    let free = |base: u16| {
        base < u16::MAX - 3
            && (base..base + 3).all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
    };
    for _ in 0..100 {
        let listeners: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("local addr").port())
            .collect();
        drop(listeners);
        if free(ports[0]) && free(ports[1]) && ports[0].abs_diff(ports[1]) >= 3 {
            return (ports[0], ports[1]);
        }
    }
    panic!("no run of three free ports found");
}

/// The last line of `output`'s standard output, as JSON.
fn last_json_line(output: &Output) -> Value {
    let stdout = text(&output.stdout);
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|error| panic!("{error}: {last:?}"))
}

fn count(report: &Value, name: &str) -> u64 {
    report["counts"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counts.{name} in {report:#}"))
}

#[test]
fn bench_consume_at_low_rate_consumes_every_message_once_and_reports_latency() {
    let dev = Dev::start();
    // Messages from before the run, in the queue key `old` maps to: they must be skipped (a
    // value this short would be counted as foreign if it were read).
    let old = dev.run(
        &["produce", "--topic", "test", "--key", "old"],
        b"1\n2\n3\n",
    );
    assert!(old.status.success(), "{}", text(&old.stderr));

    let output = dev.run(
        &[
            "bench",
            "consume",
            "--qps",
            "40",
            "--producers",
            "4",
            "--message-bytes",
            "64",
            "--seconds",
            "2",
            "--warmup-s",
            "0.5",
            "--drain-s",
            "5",
            "--report-every-s",
            "1",
        ],
        b"",
    );
    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    let stdout = text(&output.stdout);
    for expected in [
        "interval end-to-end: total",
        "total end-to-end: total",
        "total produce-ack: total",
        "latency(ms)",
        ">=1000",
        "messages: produced",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }
    let report = last_json_line(&output);
    assert_eq!(report["bench"], "consume", "{report:#}");

    // Every message accounted for: 40/s for 2.5 s is about 100.
    let produced = count(&report, "produced");
    assert!((60..=140).contains(&produced), "{report:#}");
    assert_eq!(count(&report, "acknowledged"), produced, "{report:#}");
    assert_eq!(count(&report, "consumed"), produced, "{report:#}");
    for zero in [
        "failed",
        "missing",
        "duplicates",
        "consumed_unacknowledged",
        "foreign",
    ] {
        assert_eq!(count(&report, zero), 0, "{zero} in {report:#}");
    }
    assert!(report["drained_ms"].is_number(), "{report:#}");

    // The queue written before the run was skipped: its consumer started past those three.
    let starts: Vec<u64> = report["start_offsets"]
        .as_array()
        .expect("start offsets")
        .iter()
        .map(|s| s.as_u64().expect("an offset"))
        .collect();
    assert_eq!(starts.len(), 8, "{report:#}");
    assert_eq!(starts.iter().filter(|&&s| s == 4).count(), 1, "{starts:?}");
    assert_eq!(starts.iter().filter(|&&s| s == 1).count(), 7, "{starts:?}");

    // Latency figures of the measured time (after the warmup): present and ordered.
    for figure in ["end_to_end", "produce_ack"] {
        let latency = &report[figure];
        let total = latency["total"].as_u64().expect("total");
        assert!(total > 0 && total <= produced, "{figure}: {latency:#}");
        let buckets: u64 = latency["buckets"]
            .as_array()
            .expect("buckets")
            .iter()
            .map(|b| b["count"].as_u64().expect("count"))
            .sum();
        assert_eq!(buckets, total, "{figure}: every message in one bucket");
        let p50 = latency["p50_ms"].as_f64().expect("p50");
        let p99 = latency["p99_ms"].as_f64().expect("p99");
        assert!(p50 > 0.0 && p50 <= p99, "{figure}: {latency:#}");
    }
    assert_eq!(
        report["end_to_end"]["return_codes"]["OK"],
        report["end_to_end"]["total"]
    );

    // The group's cursors followed the consumers: nothing left to read.
    let lag = dev.run(
        &["consume", "--topic", "test", "--group", "g1", "--json"],
        b"",
    );
    assert!(lag.status.success(), "{}", text(&lag.stderr));
    assert_eq!(text(&lag.stdout), "", "the cursors were committed");

    // A group that does not read the topic is refused before anything is produced.
    let unknown = dev.run(
        &["bench", "consume", "--group", "nobody", "--seconds", "1"],
        b"",
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown.stderr).contains("does not read topic"),
        "{}",
        text(&unknown.stderr)
    );
}

#[test]
fn bench_consume_refuses_options_that_make_no_sense_before_running() {
    for (args, named) in [
        (&["--qps", "0"][..], "qps"),
        (&["--qps", "100000000"][..], "qps"),
        (&["--message-bytes", "10"][..], "message bytes"),
        (&["--seconds", "0"][..], "seconds"),
        (&["--seconds=-1"][..], "--seconds -1"),
        (&["--drain-s", "0"][..], "drain"),
        (&["--producers", "0"][..], "producers"),
        (&["--qps", "1000000", "--seconds", "3000"][..], "messages"),
    ] {
        // Nothing listens on port 1: an option error must come before any connection.
        let output = phxq()
            .args(["bench", "consume", "--server", "127.0.0.1:1"])
            .args(args)
            .output()
            .expect("run phxq");
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}: nothing ran");
    }
}

#[test]
fn bench_produce_over_streams_stores_every_acknowledged_message() {
    let dev = Dev::start();
    let output = dev.run(
        &[
            "bench",
            "produce",
            "--stream",
            "--producers",
            "4",
            "--bytes",
            "64",
            "--duration-s",
            "1",
            "--warmup-s",
            "0.2",
            "--fsync-probe-s",
            "0",
            "--json",
        ],
        b"",
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let line = last_json_line(&output);
    assert_eq!(line["stream"], true, "{line:#}");
    let report = &line["report"];
    let acked = report["messages_acked"].as_u64().expect("messages_acked");
    assert!(acked > 0, "{report:#}");
    assert_eq!(report["return_codes"]["OK"], report["total"], "{report:#}");

    // What the producers were told is stored is there (calls outside the measured second
    // stored more).
    let stored = dev.run(
        &[
            "consume", "--topic", "test", "--group", "g1", "--json", "--max", "100000",
        ],
        b"",
    );
    assert!(stored.status.success(), "{}", text(&stored.stderr));
    let lines = text(&stored.stdout).lines().count() as u64;
    assert!(lines >= acked, "{lines} stored, {acked} acknowledged");
}
