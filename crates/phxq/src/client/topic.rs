//! `phxq topic create|list|describe|alter|delete`: topics managed through the API.
//!
//! Every replication group keeps its own replicated topic table, so a change is one
//! `PutTopic` or `DeleteTopic` call per group, sent to each group's master (redirects
//! followed as for every call) all at once; progress goes to stderr, one line per group.
//! A change that some groups refused or never answered leaves the store inconsistent
//! (`topic list` says so); the calls are idempotent, so re-running the command finishes it.
//! Once every group committed it, the command waits (bounded) until every node's view shows
//! it, so a command run next against any node sees the change.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use phxq_node::config::{REPLAY_AGE_MS_DEFAULT, REPLAY_COUNT_DEFAULT};
use phxq_types::DEDUP_WINDOW_DEFAULT;
use serde_json::json;
use tokio::task::JoinSet;

use super::{ClientError, Connection, Router, check_name, client_runtime, refused};
use crate::table::{Align, render};
use crate::{CommandResult, print_line};
use phxq_proto::api;
use phxq_types::ErrorCode;

/// How long a change may take to show in every node's view before the command says so and
/// stops waiting, in milliseconds.
const CONVERGE_WAIT_MS: u64 = 10_000;
/// Pause between two looks at the nodes' views, in milliseconds.
const CONVERGE_POLL_MS: u64 = 50;

/// Settings of `topic create` and `topic alter` (absent: the default on create, unchanged on
/// alter).
#[derive(Debug, clap::Args)]
pub struct TopicSettings {
    /// Number of queues (1 to 4096); an alter may only add queues.
    #[arg(long)]
    queues: Option<u32>,
    /// The consumer groups that read the topic, comma-separated (replaces the list).
    #[arg(long, value_delimiter = ',', value_name = "G1,G2")]
    groups: Option<Vec<String>>,
    /// Adds a consumer group (alter; may repeat). It starts at the oldest retained message.
    #[arg(long, value_name = "GROUP")]
    add_group: Vec<String>,
    /// Removes a consumer group and its cursors (alter; may repeat).
    #[arg(long, value_name = "GROUP")]
    remove_group: Vec<String>,
    /// Producer message ids remembered per queue for deduplication (0: off; default 1000).
    #[arg(long, value_name = "N")]
    dedup_window: Option<u32>,
    /// Messages kept per queue behind the slowest consumer group (default 10000).
    #[arg(long, value_name = "N")]
    replay_count: Option<u64>,
    /// Age of messages kept behind the slowest consumer group: ms, or with s, m, h or d
    /// (default 1h).
    #[arg(long, value_name = "AGE", value_parser = parse_age_ms)]
    replay_age: Option<u64>,
    /// Messages older than this may be deleted even if unconsumed (ms or s/m/h/d; "none" for
    /// no cap, the default).
    #[arg(long, value_name = "AGE", value_parser = parse_optional_age_ms)]
    max_age: Option<Cap>,
    /// Per queue, the oldest messages beyond this many bytes may be deleted even if
    /// unconsumed ("none" for no cap, the default).
    #[arg(long, value_name = "BYTES", value_parser = parse_optional_u64)]
    max_bytes: Option<Cap>,
    /// The consumer group that --retry, --dead-letter, --rate-messages, --rate-bytes and
    /// --max-in-flight set (one group per command).
    #[arg(long, value_name = "GROUP")]
    settings_for: Option<String>,
    /// Retry tiers of --settings-for: ATTEMPTSxDELAY,... tried in order, e.g. 3x1s,5x1m
    /// ("none": no retries).
    #[arg(long, value_name = "TIERS", requires = "settings_for", value_parser = parse_tiers)]
    retry: Option<Tiers>,
    /// Dead-letter topic of --settings-for ("none" to clear).
    #[arg(long, value_name = "TOPIC", requires = "settings_for", value_parser = parse_optional_name)]
    dead_letter: Option<OptionalName>,
    /// Messages per second at most for --settings-for ("none" to clear).
    #[arg(long, value_name = "N", requires = "settings_for", value_parser = parse_optional_u64)]
    rate_messages: Option<Cap>,
    /// Bytes per second at most for --settings-for ("none" to clear).
    #[arg(long, value_name = "N", requires = "settings_for", value_parser = parse_optional_u64)]
    rate_bytes: Option<Cap>,
    /// Messages handled at once at most for --settings-for ("none" to clear).
    #[arg(long, value_name = "N", requires = "settings_for", value_parser = parse_optional_u64)]
    max_in_flight: Option<Cap>,
}

/// Retry tiers from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tiers(Vec<api::RetryTier>);

/// A topic name or "none".
#[derive(Clone, Debug, PartialEq, Eq)]
struct OptionalName(Option<String>);

fn parse_tiers(text: &str) -> Result<Tiers, String> {
    if text == "none" {
        return Ok(Tiers(Vec::new()));
    }
    let tier = |part: &str| {
        let (attempts, delay) = part
            .split_once('x')
            .ok_or_else(|| format!("retry tier {part:?}: expected ATTEMPTSxDELAY, like 3x1s"))?;
        Ok(api::RetryTier {
            attempts: attempts
                .parse()
                .map_err(|_| format!("retry tier {part:?}: {attempts:?} is not a count"))?,
            delay_ms: parse_age_ms(delay)?,
        })
    };
    text.split(',')
        .map(tier)
        .collect::<Result<_, String>>()
        .map(Tiers)
}

fn parse_optional_name(text: &str) -> Result<OptionalName, String> {
    Ok(OptionalName((text != "none").then(|| text.to_string())))
}

/// A cap that may be "none" (clap reads `Option<Option<_>>` as a flag with an optional
/// value, hence the wrapper).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cap(Option<u64>);

/// Arguments of `phxq topic create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic's name: 1 to 128 of [A-Za-z0-9._-].
    name: String,
    #[command(flatten)]
    settings: TopicSettings,
    /// One JSON document instead of a sentence.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq topic alter`.
#[derive(Debug, clap::Args)]
pub struct AlterArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    name: String,
    #[command(flatten)]
    settings: TopicSettings,
    /// One JSON document instead of a sentence.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq topic delete`, `topic describe`.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    name: String,
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `phxq topic list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    connection: Connection,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_age_ms(text: &str) -> Result<u64, String> {
    let (digits, unit_ms) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (text, 1),
        Some((at, _)) => {
            let unit = match &text[at..] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                other => return Err(format!("unknown unit {other:?}: use ms, s, m, h or d")),
            };
            (&text[..at], unit)
        }
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a number with an optional unit"))?;
    value
        .checked_mul(unit_ms)
        .ok_or_else(|| format!("{text} is too long"))
}

fn parse_optional_age_ms(text: &str) -> Result<Cap, String> {
    match text {
        "none" => Ok(Cap(None)),
        _ => parse_age_ms(text).map(|ms| Cap(Some(ms))),
    }
}

fn parse_optional_u64(text: &str) -> Result<Cap, String> {
    match text {
        "none" => Ok(Cap(None)),
        _ => text
            .parse()
            .map(|n| Cap(Some(n)))
            .map_err(|_| format!("{text:?} is not a number or \"none\"")),
    }
}

impl TopicSettings {
    /// `base` with these settings applied.
    fn apply_to(&self, mut base: api::TopicConfig) -> api::TopicConfig {
        if let Some(queues) = self.queues {
            base.queues = queues;
        }
        if let Some(groups) = &self.groups {
            base.consumer_groups = groups.clone();
        }
        base.consumer_groups
            .retain(|group| !self.remove_group.contains(group));
        for group in &self.add_group {
            if !base.consumer_groups.contains(group) {
                base.consumer_groups.push(group.clone());
            }
        }
        if let Some(window) = self.dedup_window {
            base.dedup_window = window;
        }
        if let Some(count) = self.replay_count {
            base.replay_count = count;
        }
        if let Some(age) = self.replay_age {
            base.replay_age_ms = age;
        }
        if let Some(Cap(age)) = self.max_age {
            base.max_age_ms = age;
        }
        if let Some(Cap(bytes)) = self.max_bytes {
            base.max_bytes = bytes;
        }
        let groups = base.consumer_groups.clone();
        base.group_settings
            .retain(|settings| groups.contains(&settings.consumer_group));
        if let Some(group) = &self.settings_for {
            self.apply_group_settings(&mut base, group);
        }
        base
    }

    /// Sets the settings of `group` given on the command line; a group left with none is
    /// dropped from the list.
    fn apply_group_settings(&self, base: &mut api::TopicConfig, group: &str) {
        let position = (base.group_settings.iter())
            .position(|s| s.consumer_group == group)
            .unwrap_or_else(|| {
                base.group_settings.push(api::ConsumerGroupSettings {
                    consumer_group: group.to_string(),
                    ..Default::default()
                });
                base.group_settings.len() - 1
            });
        let settings = &mut base.group_settings[position];
        if let Some(Tiers(tiers)) = &self.retry {
            settings.retry_tiers = tiers.clone();
        }
        if let Some(OptionalName(topic)) = &self.dead_letter {
            settings.dead_letter_topic = topic.clone();
        }
        if let Some(Cap(rate)) = self.rate_messages {
            settings.rate_messages_per_s = rate;
        }
        if let Some(Cap(rate)) = self.rate_bytes {
            settings.rate_bytes_per_s = rate;
        }
        if let Some(Cap(limit)) = self.max_in_flight {
            // Over u32 is refused by the store like any value over its limit.
            settings.max_in_flight = limit.map(|l| u32::try_from(l).unwrap_or(u32::MAX));
        }
        let empty = api::ConsumerGroupSettings {
            consumer_group: group.to_string(),
            ..Default::default()
        };
        if *settings == empty {
            base.group_settings.remove(position);
        }
        base.group_settings
            .sort_by(|a, b| a.consumer_group.cmp(&b.consumer_group));
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

/// `phxq topic create`.
pub fn create(args: &CreateArgs) -> CommandResult {
    check_name("topic", &args.name)?;
    let Some(queues) = args.settings.queues else {
        return Err(ClientError::Usage("--queues is required to create a topic".into()).into());
    };
    let defaults = api::TopicConfig {
        name: args.name.clone(),
        queues,
        consumer_groups: Vec::new(),
        replay_count: REPLAY_COUNT_DEFAULT,
        replay_age_ms: REPLAY_AGE_MS_DEFAULT,
        max_age_ms: None,
        max_bytes: None,
        dedup_window: DEDUP_WINDOW_DEFAULT,
        group_settings: Vec::new(),
    };
    let config = args.settings.apply_to(defaults);
    let runtime = client_runtime()?;
    runtime.block_on(put_everywhere(
        &args.connection,
        config,
        api::PutMode::Create,
        args.json,
    ))
}

/// `phxq topic alter`: the current config (the widest group's) with the settings changed,
/// put in every group.
pub fn alter(args: &AlterArgs) -> CommandResult {
    check_name("topic", &args.name)?;
    let runtime = client_runtime()?;
    runtime.block_on(async {
        let (_, status) = Router::discover(&args.connection).await?;
        let topic = find(&status, &args.name)?;
        let current = topic.config.clone().unwrap_or_default();
        let config = args.settings.apply_to(current);
        put_everywhere(&args.connection, config, api::PutMode::Alter, args.json).await
    })
}

/// `phxq topic delete`.
pub fn delete(args: &NameArgs) -> CommandResult {
    check_name("topic", &args.name)?;
    let runtime = client_runtime()?;
    runtime.block_on(delete_everywhere(&args.connection, &args.name, args.json))
}

/// `phxq topic list`: every topic as the answering node sees it.
pub fn list(args: &ListArgs) -> CommandResult {
    let runtime = client_runtime()?;
    let (_, status) = runtime.block_on(Router::discover(&args.connection))?;
    if args.json {
        let topics: Vec<serde_json::Value> = status.topics.iter().map(topic_json).collect();
        print_line(serde_json::to_string_pretty(&topics)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = status
        .topics
        .iter()
        .map(|topic| {
            let config = topic.config.clone().unwrap_or_default();
            vec![
                topic.name.clone(),
                topic.queues.to_string(),
                config.consumer_groups.join(","),
                config.replay_count.to_string(),
                age(config.replay_age_ms),
                config.max_age_ms.map_or("-".into(), age),
                config.max_bytes.map_or("-".into(), |b| b.to_string()),
                config.dedup_window.to_string(),
                consistency(topic, status.groups_count),
            ]
        })
        .collect();
    let columns = [
        ("topic", Align::Left),
        ("queues", Align::Right),
        ("consumer groups", Align::Left),
        ("replay count", Align::Right),
        ("replay age", Align::Right),
        ("max age", Align::Right),
        ("max bytes", Align::Right),
        ("dedup window", Align::Right),
        ("state", Align::Left),
    ];
    print_line(render(&columns, &rows).trim_end())?;
    Ok(ExitCode::SUCCESS)
}

/// `phxq topic describe`: one topic's settings, and per group where groups disagree.
pub fn describe(args: &NameArgs) -> CommandResult {
    check_name("topic", &args.name)?;
    let runtime = client_runtime()?;
    let (_, status) = runtime.block_on(Router::discover(&args.connection))?;
    let topic = find(&status, &args.name)?;
    let per_group: Vec<(u64, Option<&api::TopicConfig>)> = status
        .groups
        .iter()
        .map(|group| {
            let config = group.topics.iter().find(|t| t.name == args.name);
            (group.group, config)
        })
        .collect();
    if args.json {
        let mut document = topic_json(topic);
        let groups: Vec<serde_json::Value> = per_group
            .iter()
            .map(|(group, config)| json!({"group": group, "config": config.map(config_json)}))
            .collect();
        document["groups"] = json!(groups);
        print_line(serde_json::to_string_pretty(&document)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let config = topic.config.clone().unwrap_or_default();
    let mut text = format!("topic {}\n", topic.name);
    text += &format!("  queues           {}\n", topic.queues);
    let groups = if config.consumer_groups.is_empty() {
        "(none)".to_string()
    } else {
        config.consumer_groups.join(", ")
    };
    text += &format!("  consumer groups  {groups}\n");
    text += &format!("  replay count     {}\n", config.replay_count);
    text += &format!("  replay age       {}\n", age(config.replay_age_ms));
    text += &format!(
        "  max age          {}\n",
        config.max_age_ms.map_or("none".into(), age)
    );
    text += &format!(
        "  max bytes        {}\n",
        config.max_bytes.map_or("none".into(), |b| b.to_string())
    );
    text += &format!("  dedup window     {}\n", config.dedup_window);
    for settings in &config.group_settings {
        text += &format!(
            "  group {}: {}\n",
            settings.consumer_group,
            describe_settings(settings)
        );
    }
    text += &format!(
        "  state            {}\n",
        consistency(topic, status.groups_count)
    );
    for (group, group_config) in &per_group {
        match group_config {
            None => text += &format!("  g{group}: no such topic\n"),
            Some(c) if **c != config => text += &format!("  g{group}: {}\n", config_json(c)),
            Some(_) => {}
        }
    }
    print_line(text.trim_end())?;
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Fan-out

/// What one group answered.
enum GroupOutcome {
    Changed,
    Unchanged,
    /// Delete: the group had no such topic (already deleted by an earlier run).
    Absent,
    Failed(ClientError),
}

async fn put_everywhere(
    connection: &Connection,
    config: api::TopicConfig,
    mode: api::PutMode,
    json: bool,
) -> CommandResult {
    let (router, status) = Router::discover(connection).await?;
    let verb = if mode == api::PutMode::Create {
        "create"
    } else {
        "alter"
    };
    let mut calls = JoinSet::new();
    for group in 0..u64::from(status.groups_count) {
        let router = router.clone();
        let request = api::PutTopicRequest {
            group,
            topic: Some(config.clone()),
            mode: mode as i32,
            store_id: status.store_id,
        };
        calls.spawn(async move {
            let outcome = router
                .call(Some(group), |mut client| {
                    let request = request.clone();
                    async move {
                        let response = client.put_topic(request).await?.into_inner();
                        let error = response.error.clone();
                        Ok((response.changed, error))
                    }
                })
                .await;
            let outcome = match outcome {
                Ok(true) => GroupOutcome::Changed,
                Ok(false) => GroupOutcome::Unchanged,
                Err(error) => GroupOutcome::Failed(error),
            };
            (group, outcome)
        });
    }
    let outcomes = gather(calls, status.groups_count).await?;
    let target = config.clone();
    finish(
        connection,
        verb,
        &config.name,
        outcomes,
        json,
        move |tables| tables.iter().all(|table| table.contains(&target)),
    )
    .await
}

async fn delete_everywhere(connection: &Connection, name: &str, json: bool) -> CommandResult {
    let (router, status) = Router::discover(connection).await?;
    let mut calls = JoinSet::new();
    for group in 0..u64::from(status.groups_count) {
        let router = router.clone();
        let request = api::DeleteTopicRequest {
            group,
            name: name.to_string(),
            store_id: status.store_id,
        };
        calls.spawn(async move {
            let outcome = router
                .call(Some(group), |mut client| {
                    let request = request.clone();
                    async move {
                        let response = client.delete_topic(request).await?.into_inner();
                        Ok(((), response.error))
                    }
                })
                .await;
            let outcome = match outcome {
                Ok(()) => GroupOutcome::Changed,
                Err(ClientError::Refused(failure))
                    if failure.code == Some(ErrorCode::UnknownTopic) =>
                {
                    GroupOutcome::Absent
                }
                Err(error) => GroupOutcome::Failed(error),
            };
            (group, outcome)
        });
    }
    let outcomes = gather(calls, status.groups_count).await?;
    if outcomes
        .iter()
        .all(|(_, outcome)| matches!(outcome, GroupOutcome::Absent))
    {
        return Err(refused(
            ErrorCode::UnknownTopic,
            format!("no topic {name:?} in this store"),
        )
        .into());
    }
    let gone = name.to_string();
    finish(connection, "delete", name, outcomes, json, move |tables| {
        tables
            .iter()
            .all(|table| table.iter().all(|t| t.name != gone))
    })
    .await
}

/// Waits for every group's answer, printing each on stderr as it comes.
async fn gather(
    mut calls: JoinSet<(u64, GroupOutcome)>,
    groups: u32,
) -> Result<Vec<(u64, GroupOutcome)>, ClientError> {
    let mut outcomes = Vec::new();
    while let Some(joined) = calls.join_next().await {
        let (group, outcome) = joined.map_err(|error| ClientError::Usage(error.to_string()))?;
        let what = match &outcome {
            GroupOutcome::Changed => "done".to_string(),
            GroupOutcome::Unchanged => "already so".to_string(),
            GroupOutcome::Absent => "no such topic".to_string(),
            GroupOutcome::Failed(error) => format!("FAILED: {error}"),
        };
        outcomes.push((group, outcome));
        eprintln!("[{}/{groups}] g{group}: {what}", outcomes.len());
    }
    outcomes.sort_by_key(|(group, _)| *group);
    Ok(outcomes)
}

/// Reports the fan-out: the first refusal if every group refused alike (nothing changed),
/// else how many groups failed; then waits until every node's view satisfies `done`.
async fn finish(
    connection: &Connection,
    verb: &str,
    name: &str,
    outcomes: Vec<(u64, GroupOutcome)>,
    json: bool,
    done: impl Fn(&[&[api::TopicConfig]]) -> bool,
) -> CommandResult {
    let groups = outcomes.len();
    let mut failures: Vec<(u64, ClientError)> = Vec::new();
    let mut changed = 0;
    for (group, outcome) in outcomes {
        match outcome {
            GroupOutcome::Failed(error) => failures.push((group, error)),
            GroupOutcome::Changed => changed += 1,
            GroupOutcome::Unchanged | GroupOutcome::Absent => {}
        }
    }
    if failures.len() == groups {
        // Refused everywhere (bad input, most likely): nothing changed, one error.
        let (_, first) = failures.swap_remove(0);
        return Err(first.into());
    }
    if !failures.is_empty() {
        let list: Vec<String> = failures.iter().map(|(g, _)| format!("g{g}")).collect();
        return Err(ClientError::Usage(format!(
            "{verb} topic {name}: {} of {groups} groups failed ({}; first: {}); the other \
             groups have the change: run the same command again to finish it",
            failures.len(),
            list.join(", "),
            failures[0].1
        ))
        .into());
    }
    let converged = wait_for_views(connection, &done).await?;
    if !converged {
        eprintln!(
            "phxq: warning: committed in every group, but not every node showed it within \
             {CONVERGE_WAIT_MS} ms"
        );
    }
    if json {
        print_line(
            json!({"topic": name, "action": verb, "groups": groups, "changed_groups": changed}),
        )?;
    } else {
        let tail = if changed == 0 { " (no change)" } else { "" };
        print_line(format!(
            "{verb} topic {name}: done in {groups} groups{tail}"
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks every node for its view until each one's group tables satisfy `done`, or the wait
/// ends (`false`). A node that does not answer is skipped (it catches up when it returns).
async fn wait_for_views(
    connection: &Connection,
    done: &impl Fn(&[&[api::TopicConfig]]) -> bool,
) -> Result<bool, ClientError> {
    let (router, status) = Router::discover(connection).await?;
    let deadline = Instant::now() + Duration::from_millis(CONVERGE_WAIT_MS);
    let mut waiting: Vec<String> = status.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let mut told = false;
    while !waiting.is_empty() {
        let mut behind = Vec::new();
        for addr in waiting {
            let mut client = router.client(&addr)?;
            let call = client.cluster_status(api::ClusterStatusRequest {});
            let timeout = Duration::from_millis(super::CONNECT_TIMEOUT_MS);
            let Ok(Ok(view)) = tokio::time::timeout(timeout, call).await else {
                eprintln!("phxq: {addr} did not answer; not waiting for it");
                continue;
            };
            let view = view.into_inner();
            let tables: Vec<&[api::TopicConfig]> =
                view.groups.iter().map(|g| g.topics.as_slice()).collect();
            if view.error.is_some() || tables.len() != status.groups.len() || !done(&tables) {
                behind.push(addr);
            }
        }
        waiting = behind;
        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        if !told {
            eprintln!("waiting for {} to apply it", waiting.join(", "));
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(CONVERGE_POLL_MS)).await;
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Presentation

/// The topic `name` in a status, or `UNKNOWN_TOPIC`.
fn find<'a>(
    status: &'a api::ClusterStatusResponse,
    name: &str,
) -> Result<&'a api::TopicStatus, ClientError> {
    status
        .topics
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| {
            refused(
                ErrorCode::UnknownTopic,
                format!("no topic {name:?} in this store"),
            )
        })
}

fn consistency(topic: &api::TopicStatus, groups: u32) -> String {
    if topic.consistent {
        "ok".to_string()
    } else {
        format!(
            "INCONSISTENT: {} of {groups} groups have it, configs differ or a change is half \
             done; re-run it",
            topic.groups_with_topic
        )
    }
}

/// A consumer group's settings in one line.
fn describe_settings(settings: &api::ConsumerGroupSettings) -> String {
    let tiers: Vec<String> = (settings.retry_tiers.iter())
        .map(|t| format!("{}x{}", t.attempts, age(t.delay_ms)))
        .collect();
    let or_none = |value: Option<String>| value.unwrap_or_else(|| "none".to_string());
    format!(
        "retry {}, dead letter {}, {} msgs/s, {} bytes/s, max in flight {}",
        if tiers.is_empty() {
            "none".to_string()
        } else {
            tiers.join(",")
        },
        or_none(settings.dead_letter_topic.clone()),
        or_none(settings.rate_messages_per_s.map(|r| r.to_string())),
        or_none(settings.rate_bytes_per_s.map(|r| r.to_string())),
        or_none(settings.max_in_flight.map(|r| r.to_string())),
    )
}

fn settings_json(settings: &api::ConsumerGroupSettings) -> serde_json::Value {
    let tiers: Vec<serde_json::Value> = (settings.retry_tiers.iter())
        .map(|t| json!({"attempts": t.attempts, "delay_ms": t.delay_ms}))
        .collect();
    json!({
        "consumer_group": settings.consumer_group,
        "retry_tiers": tiers,
        "dead_letter_topic": settings.dead_letter_topic,
        "rate_messages_per_s": settings.rate_messages_per_s,
        "rate_bytes_per_s": settings.rate_bytes_per_s,
        "max_in_flight": settings.max_in_flight,
    })
}

fn config_json(config: &api::TopicConfig) -> serde_json::Value {
    let settings: Vec<serde_json::Value> =
        config.group_settings.iter().map(settings_json).collect();
    json!({
        "group_settings": settings,
        "queues": config.queues,
        "consumer_groups": config.consumer_groups,
        "replay_count": config.replay_count,
        "replay_age_ms": config.replay_age_ms,
        "max_age_ms": config.max_age_ms,
        "max_bytes": config.max_bytes,
        "dedup_window": config.dedup_window,
    })
}

fn topic_json(topic: &api::TopicStatus) -> serde_json::Value {
    let mut document = json!({
        "topic": topic.name,
        "queues": topic.queues,
        "consistent": topic.consistent,
        "groups_with_topic": topic.groups_with_topic,
    });
    document["config"] = topic.config.as_ref().map_or(json!(null), config_json);
    document
}

/// An age in ms, in the largest unit that divides it.
fn age(ms: u64) -> String {
    for (unit, unit_ms) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms > 0 && ms.is_multiple_of(unit_ms) {
            return format!("{}{unit}", ms / unit_ms);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_units_and_print_in_the_largest() {
        assert_eq!(parse_age_ms("250"), Ok(250));
        assert_eq!(parse_age_ms("90s"), Ok(90_000));
        assert_eq!(parse_age_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_age_ms("7d"), Ok(604_800_000));
        assert!(parse_age_ms("5y").is_err());
        assert!(parse_age_ms("h").is_err());
        assert!(parse_age_ms(&format!("{}d", u64::MAX)).is_err());
        assert_eq!(parse_optional_age_ms("none"), Ok(Cap(None)));
        assert_eq!(parse_optional_u64("12"), Ok(Cap(Some(12))));
        assert_eq!(age(7_200_000), "2h");
        assert_eq!(age(1_500), "1500ms");
        assert_eq!(age(0), "0ms");
    }

    #[test]
    fn retry_tiers_parse_as_attempts_times_delay() {
        let tier = |attempts, delay_ms| api::RetryTier { attempts, delay_ms };
        assert_eq!(
            parse_tiers("3x1s,5x2m"),
            Ok(Tiers(vec![tier(3, 1_000), tier(5, 120_000)]))
        );
        assert_eq!(parse_tiers("none"), Ok(Tiers(Vec::new())));
        assert!(parse_tiers("3").is_err());
        assert!(parse_tiers("ax1s").is_err());
        assert!(parse_tiers("3x1y").is_err());
    }
}
