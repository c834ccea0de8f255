//! Which member of a consumer group reads which queue: rendezvous (highest random weight)
//! hashing, shared by the consumer library (static member lists) and the group coordinator
//! in the node (live members), so both compute the same owner from the same list.
//!
//! Queue `q` of topic `t` goes to the member with the highest score `mix(t, q, member)`:
//! each queue has exactly one owner; adding or removing a member moves only the queues it
//! gains or loses. Pure; the function never changes (members of different versions must
//! agree).

use crate::QueueId;

/// The member of `members` that reads queue `queue` of `topic`; `None` when `members` is
/// empty. Ties (never seen in practice) go to the smallest name.
pub fn queue_owner<'m, S: AsRef<str>>(
    topic: &str,
    queue: QueueId,
    members: &'m [S],
) -> Option<&'m str> {
    let queue_hash = mix(fnv1a_64(topic.as_bytes()) ^ mix(u64::from(queue)));
    members
        .iter()
        .map(|member| {
            let member = member.as_ref();
            (mix(queue_hash ^ fnv1a_64(member.as_bytes())), member)
        })
        .max_by(|(a, name_a), (b, name_b)| a.cmp(b).then_with(|| name_b.cmp(name_a)))
        .map(|(_, member)| member)
}

/// FNV-1a, 64 bits (the same function as the client's key hash).
fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// SplitMix64's finaliser: spreads FNV's poorly mixed low bits over the whole word.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
