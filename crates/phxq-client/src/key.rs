//! Which queue a key goes to.
//!
//! `queue = FNV-1a 64(key) mod queues`. Order per key rests on this mapping: every producer,
//! in every language and version, must send a key to the same queue, so **the function never
//! changes** (a new mapping would need a new topic or a migration). FNV-1a 64 is published
//! (IETF draft-eastlake-fnv), has no seed and no platform dependence, and is what
//! `phxq produce --key` uses.

use phxq_types::QueueId;

/// FNV-1a, 64 bits, of `bytes`.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// The queue of `key` in a topic of `queues` queues (`queues > 0`): `fnv1a_64(key) mod
/// queues`. Stable forever (see the module documentation).
pub fn queue_of_key(key: &[u8], queues: u32) -> QueueId {
    assert!(queues > 0, "a topic has at least one queue");
    // The remainder is below `queues`, a u32.
    (fnv1a_64(key) % u64::from(queues)) as QueueId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn the_mapping_of_keys_to_queues_never_changes() {
        // Pinned values: if this test fails, per-key order breaks for every deployed topic.
        let pinned = [
            ("user-1", 4, 20),
            ("user-2", 5, 5),
            ("order-77", 4, 12),
            ("a", 4, 4),
        ];
        for (key, of_8, of_24) in pinned {
            assert_eq!(queue_of_key(key.as_bytes(), 8), of_8, "{key}");
            assert_eq!(queue_of_key(key.as_bytes(), 24), of_24, "{key}");
        }
        assert_eq!(queue_of_key(b"foobar", 1000), 968);
        assert_eq!(queue_of_key(b"anything", 1), 0);
        assert!((0..10_000u32).all(|i| queue_of_key(&i.to_le_bytes(), 7) < 7));
    }
}
