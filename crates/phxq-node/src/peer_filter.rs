//! What a raft message from a peer must satisfy before raft-rs steps it.
//!
//! raft-rs 0.7 trusts its peers: a `MsgPropose` from a peer is appended by a leader as if a
//! client had proposed it, an empty one panics it ("stepped empty MsgProp"), a heartbeat whose
//! commit is past the follower's log panics it in `commit_to`, an append response claiming an
//! index past the leader's log lets it commit entries it never replicated (and panic there),
//! an append that conflicts below the commit index panics `maybe_append`, a snapshot whose
//! configuration is not the group's panics `restore`, and a `request_snapshot` makes the
//! leader ask its storage for a snapshot it cannot make (fatal). Peers are authenticated (TLS),
//! so these are defences against a buggy peer, in depth: each such message is dropped and
//! counted, never stepped.
//!
//! The allowlist is what our nodes send each other: raft-rs emits nothing else to a peer
//! because we propose only as leader (`Replica::propose_pending`), call `transfer_leader` only
//! as leader (so `MsgTransferLeader` stays local), never use read-index or request snapshots,
//! and never change membership (so every entry is `EntryNormal`).

use raft::eraftpb::{EntryType, Message, MessageType};
use raft::{Raft, Storage};

/// Why a peer's message was dropped.
pub(crate) type Rejection = String;

/// Checks `message` from a peer against the group's raft state; `members` are the group's
/// voters (sorted). `Ok` means raft-rs may step it without panicking.
pub(crate) fn check<S: Storage>(
    raft: &Raft<S>,
    members: &[u64],
    message: &Message,
) -> Result<(), Rejection> {
    let kind = message.get_msg_type();
    if !sent_by_peers(kind) {
        return Err(format!("{kind:?} is never sent by a peer"));
    }
    if message.term == 0 {
        // raft-rs steps a term-0 message as local, whatever its term would have said.
        return Err(format!("{kind:?} without a term"));
    }
    if message.request_snapshot != 0 {
        return Err(format!("{kind:?} requests a snapshot; our nodes never do"));
    }
    if kind != MessageType::MsgAppend && !message.entries.is_empty() {
        return Err(format!("{kind:?} carrying entries"));
    }
    if kind != MessageType::MsgSnapshot && message.has_snapshot() {
        return Err(format!("{kind:?} carrying a snapshot"));
    }
    let last_index = raft.raft_log.last_index();
    match kind {
        MessageType::MsgHeartbeat if message.commit > last_index => Err(format!(
            "heartbeat commits {} past the last index {last_index}",
            message.commit
        )),
        MessageType::MsgAppendResponse if !message.reject && message.index > last_index => {
            Err(format!(
                "append response acknowledges {} past the last index {last_index}",
                message.index
            ))
        }
        MessageType::MsgAppend => check_append(raft, message),
        MessageType::MsgSnapshot => check_snapshot(members, message),
        _ => Ok(()),
    }
}

/// Message types one of our nodes sends another.
fn sent_by_peers(kind: MessageType) -> bool {
    use MessageType::*;
    matches!(
        kind,
        MsgAppend
            | MsgAppendResponse
            | MsgRequestVote
            | MsgRequestVoteResponse
            | MsgRequestPreVote
            | MsgRequestPreVoteResponse
            | MsgSnapshot
            | MsgHeartbeat
            | MsgHeartbeatResponse
            | MsgTimeoutNow
    )
}

/// Entries contiguous after `index`, normal, with terms from `log_term` up to the message's
/// term; none conflicting with a committed entry here.
fn check_append<S: Storage>(raft: &Raft<S>, message: &Message) -> Result<(), Rejection> {
    if message.log_term > message.term {
        return Err(format!(
            "append's previous term {} is past its term {}",
            message.log_term, message.term
        ));
    }
    let mut term = message.log_term;
    for (offset, entry) in message.entries.iter().enumerate() {
        let expected = message.index.checked_add(offset as u64 + 1);
        if Some(entry.index) != expected {
            return Err(format!("append entry {} out of sequence", entry.index));
        }
        if entry.get_entry_type() != EntryType::EntryNormal {
            return Err(format!("append entry {} changes membership", entry.index));
        }
        if entry.term < term || entry.term > message.term {
            return Err(format!(
                "append entry {} has term {}",
                entry.index, entry.term
            ));
        }
        term = entry.term;
    }
    let log = &raft.raft_log;
    if log.match_term(message.index, message.log_term) {
        let conflict = log.find_conflict(&message.entries);
        if conflict != 0 && conflict <= log.committed {
            return Err(format!(
                "append rewrites committed entry {conflict} (commit {})",
                log.committed
            ));
        }
    }
    Ok(())
}

/// A snapshot of this group's configuration: its members as voters, nothing else.
fn check_snapshot(members: &[u64], message: &Message) -> Result<(), Rejection> {
    if !message.has_snapshot() {
        return Err("snapshot message without a snapshot".into());
    }
    let snapshot = message.get_snapshot();
    let metadata = snapshot.get_metadata();
    if metadata.index == 0 || metadata.term == 0 || metadata.term > message.term {
        return Err(format!(
            "snapshot at index {} term {} (message term {})",
            metadata.index, metadata.term, message.term
        ));
    }
    let conf = metadata.get_conf_state();
    let mut voters = conf.voters.clone();
    voters.sort_unstable();
    let only_voters = conf.learners.is_empty()
        && conf.voters_outgoing.is_empty()
        && conf.learners_next.is_empty()
        && !conf.auto_leave;
    if voters != members || !only_voters {
        return Err(format!("snapshot of another configuration: {conf:?}"));
    }
    Ok(())
}
