//! Which store and which queue a key goes to.
//!
//! `queue = FNV-1a 64(key) mod queues`. Order per key rests on this mapping: every producer,
//! in every language and version, must send a key to the same queue, so **the function never
//! changes** (a new mapping would need a new topic or a migration). FNV-1a 64 is published
//! (IETF draft-eastlake-fnv), has no seed and no platform dependence, and is what
//! `phxq produce --key` uses.
//!
//! When a producer writes to several stores (independent 3-node clusters, each with its own
//! topic tables), the key first picks a store, by **weighted rendezvous hashing**
//! ([`store_of_key`]): store `s` of weight `w` scores `-w / ln(u)`, where `u` in (0, 1) is
//! a uniform hash of (the store's name, the key) ([`store_hash`]); the highest score wins
//! (ties: the smallest name). Then the queue is `queue_of_key(key, queues of that store's
//! topic)`. Properties: a key lands in store `s` with probability `w_s / sum(w)`; adding a
//! store moves only the keys it wins (about its share), removing one moves only its keys,
//! and changing a store's weight moves keys only to it (a raise) or only from it (a cut).
//! The store's *name* enters the hash, never its position in a list, so reordering the
//! configured stores moves nothing. Like the queue mapping, **the function never changes**:
//! per-key order across stores rests on it. `ln` is the platform's IEEE double logarithm
//! (at most 1 ulp off): two scores within an ulp of each other could rank differently on
//! another libm, which happens for about one key in 2^50.

use phxq_types::QueueId;

/// A store as the key routing sees it: its stable name and its weight (at least 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreWeight<'a> {
    /// The store's name (what a config calls it; 1 to 255 bytes).
    pub name: &'a str,
    /// Its share of the keys, relative to the other stores' weights.
    pub weight: u32,
}

/// The uniform 64-bit hash of (`store`, `key`) that weighted rendezvous hashing scores:
/// `mix(FNV-1a 64(key) xor mix(FNV-1a 64(store)))`, with `mix` SplitMix64's finaliser.
/// Fixed forever (see the module documentation).
pub fn store_hash(store: &str, key: &[u8]) -> u64 {
    mix(fnv1a_64(key) ^ mix(fnv1a_64(store.as_bytes())))
}

/// The rendezvous score of `store` for `key`: `-weight / ln(u)`, `u = (top 53 bits of
/// store_hash + 0.5) / 2^53`, strictly inside (0, 1), so the score is finite and positive.
pub fn store_score(store: StoreWeight<'_>, key: &[u8]) -> f64 {
    assert!(store.weight > 0, "a store's weight is at least 1");
    let unit = ((store_hash(store.name, key) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    debug_assert!(unit > 0.0 && unit < 1.0);
    -f64::from(store.weight) / unit.ln()
}

/// The stores of `stores` in the order `key` tries them: best score first (ties: the
/// smallest name first). The first is [`store_of_key`]; store-change retry walks the rest.
/// Indices into `stores`.
pub fn store_ranking(stores: &[StoreWeight<'_>], key: &[u8]) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = stores
        .iter()
        .enumerate()
        .map(|(i, &store)| (store_score(store, key), i))
        .collect();
    scored.sort_by(|(a, i), (b, j)| {
        b.total_cmp(a)
            .then_with(|| stores[*i].name.cmp(stores[*j].name))
    });
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The store of `key` among `stores` (not empty): an index into `stores`. Fixed forever
/// (see the module documentation).
pub fn store_of_key(stores: &[StoreWeight<'_>], key: &[u8]) -> usize {
    assert!(!stores.is_empty(), "a producer has at least one store");
    let mut best = 0;
    let mut best_score = store_score(stores[0], key);
    for (i, &store) in stores.iter().enumerate().skip(1) {
        let score = store_score(store, key);
        let better = score
            .total_cmp(&best_score)
            .then_with(|| stores[best].name.cmp(store.name))
            .is_gt();
        if better {
            (best, best_score) = (i, score);
        }
    }
    best
}

/// SplitMix64's finaliser (the one `phxq_types::queue_owner` uses).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

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

    fn stores<'a>(list: &[(&'a str, u32)]) -> Vec<StoreWeight<'a>> {
        list.iter()
            .map(|&(name, weight)| StoreWeight { name, weight })
            .collect()
    }

    fn key(i: u32) -> Vec<u8> {
        format!("user-{i}").into_bytes()
    }

    /// Which store (by name) each of `count` keys goes to.
    fn owners<'a>(list: &[StoreWeight<'a>], count: u32) -> Vec<&'a str> {
        (0..count)
            .map(|i| list[store_of_key(list, &key(i))].name)
            .collect()
    }

    const KEYS: u32 = 100_000;

    #[test]
    fn the_mapping_of_keys_to_stores_never_changes() {
        // Pinned values: if this test fails, per-key order breaks for every deployed
        // multi-store producer.
        assert_eq!(store_hash("eu-1", b"user-1"), 0xd6ab_e476_2243_30c8);
        assert_eq!(store_hash("eu-2", b""), 0x1021_965a_8934_2574);
        let list = stores(&[("eu-1", 1), ("eu-2", 2), ("us-1", 3)]);
        // Computed independently (Python's FNV-1a, SplitMix64 and math.log).
        let pinned: Vec<&str> = (0..12)
            .map(|i| list[store_of_key(&list, &key(i))].name)
            .collect();
        assert_eq!(
            pinned,
            [
                "eu-2", "us-1", "us-1", "us-1", "us-1", "eu-2", "eu-2", "us-1", "eu-2", "us-1",
                "eu-2", "eu-1"
            ]
        );
    }

    #[test]
    fn the_choice_depends_on_names_and_weights_not_on_list_order() {
        let list = stores(&[("a", 3), ("b", 1), ("c", 2)]);
        let mut reversed = list.clone();
        reversed.reverse();
        assert_eq!(owners(&list, 10_000), owners(&reversed, 10_000));
        for i in 0..1_000 {
            let ranking = store_ranking(&list, &key(i));
            assert_eq!(ranking[0], store_of_key(&list, &key(i)));
            let mut sorted = ranking.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2], "a ranking is a permutation");
        }
    }

    #[test]
    fn keys_spread_within_a_few_percent_of_the_weights() {
        let list = stores(&[("a", 1), ("b", 2), ("c", 3), ("d", 10)]);
        let owners = owners(&list, KEYS);
        let total: u32 = list.iter().map(|s| s.weight).sum();
        for store in &list {
            let share = owners.iter().filter(|&&o| o == store.name).count() as f64 / KEYS as f64;
            let expected = f64::from(store.weight) / f64::from(total);
            assert!(
                (share - expected).abs() < 0.03 * expected + 0.002,
                "{}: {share:.4} of the keys, expected {expected:.4}",
                store.name
            );
        }
    }

    #[test]
    fn adding_a_store_moves_only_the_keys_it_wins_about_its_share() {
        let before = stores(&[("a", 2), ("b", 1), ("c", 1)]);
        let mut after = before.clone();
        after.push(StoreWeight {
            name: "d",
            weight: 4,
        });
        let (old, new) = (owners(&before, KEYS), owners(&after, KEYS));
        let moved: Vec<usize> = (0..old.len()).filter(|&i| old[i] != new[i]).collect();
        assert!(
            moved.iter().all(|&i| new[i] == "d"),
            "keys move only to the new store"
        );
        let share = moved.len() as f64 / KEYS as f64;
        assert!(
            (share - 0.5).abs() < 0.015,
            "{share} of the keys moved; expected 4/8"
        );
    }

    #[test]
    fn removing_a_store_moves_only_its_keys() {
        let before = stores(&[("a", 2), ("b", 1), ("c", 5)]);
        let after: Vec<StoreWeight<'_>> =
            before.iter().copied().filter(|s| s.name != "b").collect();
        let (old, new) = (owners(&before, KEYS), owners(&after, KEYS));
        for i in 0..old.len() {
            if old[i] != "b" {
                assert_eq!(old[i], new[i], "key {i} moved without its store leaving");
            }
        }
    }

    #[test]
    fn raising_a_weight_moves_keys_only_to_that_store() {
        let before = stores(&[("a", 1), ("b", 1), ("c", 1)]);
        let after = stores(&[("a", 1), ("b", 3), ("c", 1)]);
        let (old, new) = (owners(&before, KEYS), owners(&after, KEYS));
        let moved: Vec<usize> = (0..old.len()).filter(|&i| old[i] != new[i]).collect();
        assert!(moved.iter().all(|&i| new[i] == "b"));
        // b goes from 1/3 to 3/5 of the keys: 4/15 of them move.
        let share = moved.len() as f64 / KEYS as f64;
        assert!((share - 4.0 / 15.0).abs() < 0.015, "{share}");
    }
}
