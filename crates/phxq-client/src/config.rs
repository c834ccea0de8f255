//! How a [`Producer`](crate::Producer) reaches its store and how long it keeps trying.
//!
//! A [`ProducerConfig`] is plain data with defaults ([`ProducerConfig::new`]);
//! [`Producer::new`](crate::Producer::new) validates it (every limit below is checked, the
//! field at fault is named), so the producer never meets a bad value at run time.

use std::time::Duration;

use crate::connect::StoreCa;

/// Default time one send may take with all its retries: 10 s.
pub const DEADLINE_DEFAULT: Duration = Duration::from_secs(10);
/// Default time one attempt may wait for its answer: 5 s (capped by what is left of the
/// deadline). Kept below the deadline so that a node that accepts calls but never answers
/// them (a stalled disk) costs one attempt, not the whole send.
pub const ATTEMPT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Default first retry delay: 10 ms.
pub const BACKOFF_INITIAL_DEFAULT: Duration = Duration::from_millis(10);
/// Default longest retry delay: 100 ms. Short, so that a producer notices a new master within
/// about this long of its election.
pub const BACKOFF_MAX_DEFAULT: Duration = Duration::from_millis(100);

/// Most seed addresses in [`ProducerConfig::servers`] (a store has at most 7 nodes; a few
/// spare addresses are fine, a list of hundreds is a mistake).
pub const SERVERS_MAX: usize = 64;
/// Longest [`ProducerConfig::deadline`] accepted: 10 minutes.
pub const DEADLINE_MAX: Duration = Duration::from_secs(600);
/// Longest [`ProducerConfig::backoff_max`] accepted: 10 s.
pub const BACKOFF_MAX_LIMIT: Duration = Duration::from_secs(10);
/// Shortest backoff step accepted: 1 ms (a zero backoff would spin on a masterless group).
pub const BACKOFF_MIN_LIMIT: Duration = Duration::from_millis(1);
/// Most stores in [`ProducerConfig::stores`].
pub const STORES_MAX: usize = 32;
/// Largest [`StoreConfig::weight`]: 1000 (weights are relative; a thousandfold ratio is
/// already more than any real cluster needs, a larger one is a typo).
pub const STORE_WEIGHT_MAX: u32 = 1000;
/// Default [`ProducerConfig::store_change_after`]: 1 s, longer than a normal election.
pub const STORE_CHANGE_AFTER_DEFAULT: Duration = Duration::from_secs(1);
/// The name of the one store of a config given [`ProducerConfig::servers`] (as in
/// [`crate::Stored::store`]).
pub const DEFAULT_STORE_NAME: &str = "default";

/// One store of a multi-store producer ([`ProducerConfig::with_stores`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The store's stable name (a topic-style name: 1 to 128 of `[A-Za-z0-9._-]`). It is
    /// what keys hash with ([`crate::store_of_key`]): renaming a store moves its keys,
    /// reordering the list does not.
    pub name: String,
    /// Client addresses of some nodes of this store (as [`ProducerConfig::servers`]).
    pub servers: Vec<String>,
    /// The store's share of the keys, relative to the others' (1 to [`STORE_WEIGHT_MAX`]).
    pub weight: u32,
    /// The store's id, checked against its nodes (0: not checked), as
    /// [`ProducerConfig::store_id`].
    pub store_id: u64,
}

impl StoreConfig {
    /// A store named `name`, reached through `servers`, of weight `weight`.
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        servers: impl IntoIterator<Item = S>,
        weight: u32,
    ) -> StoreConfig {
        StoreConfig {
            name: name.into(),
            servers: servers.into_iter().map(Into::into).collect(),
            weight,
            store_id: 0,
        }
    }
}

/// A producer's settings. Build one with [`ProducerConfig::new`] and change the fields you
/// need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerConfig {
    /// Client addresses (`host:port` of the gRPC service) of some nodes of **one** store.
    /// One is enough: the producer learns every node, the groups and their masters from
    /// `ClusterStatus`. More let it start while some nodes are down. Empty when
    /// [`stores`](Self::stores) is given.
    pub servers: Vec<String>,
    /// Several stores, each with its servers and weight ([`with_stores`](Self::with_stores));
    /// empty: the one store of `servers`. A key goes to the store [`crate::store_of_key`]
    /// names, then to its queue there; keyless messages spread over the stores by weight.
    pub stores: Vec<StoreConfig>,
    /// The store the producer writes to; 0 accepts whichever store `servers` belong to. With
    /// a non-zero id, a node of another store refuses every call with `WRONG_STORE`.
    pub store_id: u64,
    /// How long one `send` or `send_batch` may take, all retries included. Default
    /// [`DEADLINE_DEFAULT`].
    pub deadline: Duration,
    /// How long one attempt may wait for its answer, at most (and never past the deadline).
    /// Default [`ATTEMPT_TIMEOUT_DEFAULT`].
    pub attempt_timeout: Duration,
    /// The first retry delay; each retry doubles it, up to `backoff_max`. Every delay is
    /// jittered (between half and all of the step). Default [`BACKOFF_INITIAL_DEFAULT`].
    pub backoff_initial: Duration,
    /// The longest retry delay. Default [`BACKOFF_MAX_DEFAULT`].
    pub backoff_max: Duration,
    /// Queue-change retry: when a message's queue has no master (its group answers
    /// `NO_MASTER`, `UNAVAILABLE`, or cannot be reached) the retry goes to the next queue of
    /// the topic (`q + 1 mod queues`, in the next group) instead of waiting for an election.
    ///
    /// **This gives up per-key order** for availability: a message of key `k` may land in a
    /// queue other than `k`'s and be read before, after or in parallel with `k`'s earlier
    /// messages. Leave it off (the default) when consumers rely on order per key.
    pub queue_change_retry: bool,
    /// Store-change retry (several stores only): when a message's store has had no reachable
    /// master for its queue's group for [`store_change_after`](Self::store_change_after)
    /// (`NO_MASTER`, `UNAVAILABLE`, unreachable nodes, the layout unobtainable), the message
    /// goes to the next store of its key's rendezvous ranking ([`crate::store_ranking`]).
    ///
    /// **This gives up per-key order**, like queue-change retry, and across stores: a key's
    /// messages sent meanwhile live in another store and are read independently of its
    /// others. A message moved after an uncertain attempt may be stored in both stores
    /// (message ids deduplicate per queue, not across stores). Off by default.
    pub store_change_retry: bool,
    /// How long a store may fail a message (as above) before store-change retry moves it on.
    /// Default [`STORE_CHANGE_AFTER_DEFAULT`]; below the deadline.
    pub store_change_after: Duration,
    /// Message ids (opt-in): every append of a `send` or `send_batch` carries a new id (this
    /// producer's random 64-bit token and a sequence number), and its retries reuse it, so a
    /// retry of an attempt that was stored anyway (`INDETERMINATE`, `TIMEOUT`, a lost
    /// connection) is answered with the first attempt's offsets and stores nothing: exactly
    /// once per queue, as long as the retry comes within the queue's dedup window (its topic's
    /// `dedup_window` newest ids). A queue-change retry moves messages to another queue, where
    /// the id is new: those may still be stored twice. Off by default.
    pub message_ids: bool,
    /// Send single-queue produces (a `send`, or a `send_batch` group with one queue) over
    /// one `ProduceStream` per node instead of one unary `Produce` call each: same answers,
    /// routing and retries, less CPU per message on both sides. Nodes that do not serve
    /// streams are called unary. On by default.
    pub produce_streams: bool,
    /// Where to dial nodes that are not reachable at the address the store gives for them
    /// (NAT, port forwards, tunnels, a proxy): `(advertised, dial)` pairs, both `host:port`;
    /// a node the store names `advertised` (in `ClusterStatus` or a `NOT_MASTER` answer) is
    /// called at `dial`. At most [`SERVERS_MAX`] pairs, each advertised address once. Empty
    /// by default.
    pub connect_via: Vec<(String, String)>,
    /// The token sent on every call (`authorization: Bearer <token>`), for stores with auth
    /// on (`phxq token issue`); `None` sends none. Its roles decide what this producer,
    /// consumer, seek or receiver may do; a refusal is `UNAUTHENTICATED` or
    /// `PERMISSION_DENIED`, never retried.
    pub token: Option<String>,
    /// The store's CA (`ca.pem`): `Some` dials every node over TLS and accepts only a
    /// certificate signed by it naming the node's advertised host (see `connect.rs`); `None`
    /// dials plaintext. With several stores, a bundle of their CAs. A mismatch with the
    /// node's port fails at once, [`ErrorKind::Protocol`](crate::ErrorKind::Protocol), saying
    /// what to change.
    pub ca: Option<StoreCa>,
}

impl ProducerConfig {
    /// The defaults, reaching the store through `servers` (`host:port`, any of its nodes).
    pub fn new<S: Into<String>>(servers: impl IntoIterator<Item = S>) -> ProducerConfig {
        ProducerConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            stores: Vec::new(),
            store_id: 0,
            deadline: DEADLINE_DEFAULT,
            attempt_timeout: ATTEMPT_TIMEOUT_DEFAULT,
            backoff_initial: BACKOFF_INITIAL_DEFAULT,
            backoff_max: BACKOFF_MAX_DEFAULT,
            queue_change_retry: false,
            store_change_retry: false,
            store_change_after: STORE_CHANGE_AFTER_DEFAULT,
            message_ids: false,
            produce_streams: true,
            connect_via: Vec::new(),
            token: None,
            ca: None,
        }
    }

    /// The defaults, writing to several stores (each named, with its servers and weight).
    pub fn with_stores(stores: impl IntoIterator<Item = StoreConfig>) -> ProducerConfig {
        let mut config = ProducerConfig::new(Vec::<String>::new());
        config.stores = stores.into_iter().collect();
        config
    }

    /// The stores written to: [`stores`](Self::stores), or the one store of `servers`
    /// (named [`DEFAULT_STORE_NAME`], weight 1).
    pub(crate) fn store_list(&self) -> Vec<StoreConfig> {
        if !self.stores.is_empty() {
            return self.stores.clone();
        }
        let mut store = StoreConfig::new(DEFAULT_STORE_NAME, self.servers.clone(), 1);
        store.store_id = self.store_id;
        vec![store]
    }

    /// The single-store config of `store`, for its router.
    pub(crate) fn for_store(&self, store: &StoreConfig) -> ProducerConfig {
        let mut config = self.clone();
        config.servers.clone_from(&store.servers);
        config.store_id = store.store_id;
        config.stores = Vec::new();
        config
    }

    /// Checks every field; the error names the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.stores.is_empty() {
            check_servers("servers", &self.servers)?;
        } else {
            self.validate_stores()?;
        }
        api_token(self.token.as_deref())?;
        if self.deadline.is_zero() || self.deadline > DEADLINE_MAX {
            return Err(invalid(
                "deadline",
                format!(
                    "{:?}; it must be above zero and at most {DEADLINE_MAX:?}",
                    self.deadline
                ),
            ));
        }
        if self.attempt_timeout.is_zero() {
            return Err(invalid("attempt_timeout", "must be above zero"));
        }
        if self.backoff_initial < BACKOFF_MIN_LIMIT {
            return Err(invalid(
                "backoff_initial",
                format!(
                    "{:?}; it must be at least {BACKOFF_MIN_LIMIT:?}",
                    self.backoff_initial
                ),
            ));
        }
        if self.backoff_max < self.backoff_initial || self.backoff_max > BACKOFF_MAX_LIMIT {
            return Err(invalid(
                "backoff_max",
                format!(
                    "{:?}; it must be from backoff_initial ({:?}) to {BACKOFF_MAX_LIMIT:?}",
                    self.backoff_max, self.backoff_initial
                ),
            ));
        }
        if self.store_change_retry {
            if self.stores.len() < 2 {
                return Err(invalid(
                    "store_change_retry",
                    "needs at least two stores to change to",
                ));
            }
            if self.store_change_after < BACKOFF_MIN_LIMIT
                || self.store_change_after >= self.deadline
            {
                return Err(invalid(
                    "store_change_after",
                    format!(
                        "{:?}; it must be from {BACKOFF_MIN_LIMIT:?} to below the deadline \
                         ({:?})",
                        self.store_change_after, self.deadline
                    ),
                ));
            }
        }
        self.validate_connect_via()
    }

    fn validate_connect_via(&self) -> Result<(), ConfigError> {
        if self.connect_via.len() > SERVERS_MAX {
            return Err(invalid(
                "connect_via",
                format!("{} pairs; at most {SERVERS_MAX}", self.connect_via.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, (advertised, dial)) in self.connect_via.iter().enumerate() {
            check_address(advertised)
                .and_then(|()| check_address(dial))
                .map_err(|reason| invalid(format!("connect_via[{i}]"), reason))?;
            if !seen.insert(advertised) {
                return Err(invalid(
                    format!("connect_via[{i}]"),
                    format!("{advertised:?} twice"),
                ));
            }
        }
        Ok(())
    }

    /// The address to dial for node address `addr`.
    pub(crate) fn dial<'a>(&'a self, addr: &'a str) -> &'a str {
        self.connect_via
            .iter()
            .find(|(advertised, _)| advertised == addr)
            .map_or(addr, |(_, dial)| dial.as_str())
    }

    /// The checks of [`stores`](Self::stores): bounded, each valid, no store twice (by name,
    /// by server address, or by non-zero store id).
    fn validate_stores(&self) -> Result<(), ConfigError> {
        if !self.servers.is_empty() {
            return Err(invalid(
                "servers",
                "give either servers (one store) or stores, not both",
            ));
        }
        if self.store_id != 0 {
            return Err(invalid(
                "store_id",
                "with several stores, give each store's id in its StoreConfig",
            ));
        }
        if self.stores.len() > STORES_MAX {
            return Err(invalid(
                "stores",
                format!("{} stores given; at most {STORES_MAX}", self.stores.len()),
            ));
        }
        for (i, store) in self.stores.iter().enumerate() {
            let field = |name: &str| format!("stores[{i}].{name}");
            phxq_types::validate_name(&store.name)
                .map_err(|error| invalid(field("name"), error.to_string()))?;
            if !(1..=STORE_WEIGHT_MAX).contains(&store.weight) {
                return Err(invalid(
                    field("weight"),
                    format!("{}; it must be from 1 to {STORE_WEIGHT_MAX}", store.weight),
                ));
            }
            check_servers(&field("servers"), &store.servers)?;
            for earlier in &self.stores[..i] {
                let twice = if earlier.name == store.name {
                    Some(format!("the name {:?}", store.name))
                } else if let Some(server) =
                    store.servers.iter().find(|s| earlier.servers.contains(s))
                {
                    Some(format!("the server {server:?}"))
                } else if store.store_id != 0 && store.store_id == earlier.store_id {
                    Some(format!("the store id {}", store.store_id))
                } else {
                    None
                };
                if let Some(what) = twice {
                    return Err(invalid(
                        format!("stores[{i}]"),
                        format!(
                            "a duplicate store: {what} is also store {:?}'s",
                            earlier.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// 1 to [`SERVERS_MAX`] valid addresses; `field` names the list.
/// A token that can ride in a header.
fn api_token(token: Option<&str>) -> Result<(), ConfigError> {
    phxq_proto::api::BearerToken::new(token)
        .map(drop)
        .map_err(|reason| invalid("token", reason))
}

fn check_servers(field: &str, servers: &[String]) -> Result<(), ConfigError> {
    if servers.is_empty() || servers.len() > SERVERS_MAX {
        return Err(invalid(
            field,
            format!(
                "{} addresses given; give 1 to {SERVERS_MAX} nodes of the store",
                servers.len()
            ),
        ));
    }
    for (i, server) in servers.iter().enumerate() {
        check_address(server).map_err(|reason| invalid(format!("{field}[{i}]"), reason))?;
    }
    Ok(())
}

/// Why a [`ProducerConfig`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("producer config: {field}: {reason}")]
pub struct ConfigError {
    /// The field at fault (`servers[1]`, `deadline`, ...).
    pub field: String,
    /// Why.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// `Ok` for a `host:port` the gRPC client can dial: a non-empty host, a port from 1, no
/// scheme or path.
pub(crate) fn check_address(address: &str) -> Result<(), String> {
    let bad = || format!("{address:?} is not HOST:PORT (like \"127.0.0.1:7100\")");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains('/') || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    tonic::transport::Endpoint::from_shared(format!("http://{address}")).map_err(|_| bad())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_as_documented() {
        let config = ProducerConfig::new(["127.0.0.1:7100", "localhost:7101", "[::1]:7102"]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.deadline, Duration::from_secs(10));
        assert_eq!(config.backoff_initial, Duration::from_millis(10));
        assert_eq!(config.backoff_max, Duration::from_millis(100));
        assert!(!config.queue_change_retry);
        assert!(!config.message_ids);
        assert!(config.connect_via.is_empty());
        assert_eq!(config.store_id, 0);
    }

    #[test]
    fn every_bad_field_is_named() {
        let field = |change: fn(&mut ProducerConfig)| {
            let mut config = ProducerConfig::new(["127.0.0.1:7100"]);
            change(&mut config);
            config.validate().map_err(|error| error.field)
        };
        assert_eq!(field(|c| c.servers.clear()), Err("servers".to_string()));
        assert_eq!(
            field(|c| c.servers.push("http://a:1".to_string())),
            Err("servers[1]".to_string())
        );
        for bad in ["nohost", ":7100", "h:0", "h:99999", "h:x", "a/b:1"] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
        assert_eq!(
            field(|c| c.deadline = Duration::ZERO),
            Err("deadline".to_string())
        );
        assert_eq!(
            field(|c| c.deadline = DEADLINE_MAX + Duration::from_secs(1)),
            Err("deadline".to_string())
        );
        assert_eq!(
            field(|c| c.attempt_timeout = Duration::ZERO),
            Err("attempt_timeout".to_string())
        );
        assert_eq!(
            field(|c| c.backoff_initial = Duration::ZERO),
            Err("backoff_initial".to_string())
        );
        assert_eq!(
            field(|c| c.backoff_max = Duration::from_millis(5)),
            Err("backoff_max".to_string())
        );
        fn pair(a: &str, b: &str) -> (String, String) {
            (a.to_string(), b.to_string())
        }
        assert_eq!(
            field(|c| c.connect_via = vec![pair("10.0.0.1:7100", "nohost")]),
            Err("connect_via[0]".to_string())
        );
        assert_eq!(
            field(|c| {
                c.connect_via = vec![pair("h:1", "127.0.0.1:1"), pair("h:1", "127.0.0.1:2")];
            }),
            Err("connect_via[1]".to_string())
        );
    }

    #[test]
    fn a_node_named_in_connect_via_is_dialled_at_its_pair() {
        let mut config = ProducerConfig::new(["127.0.0.1:7100"]);
        config.connect_via = vec![("10.0.0.1:7100".into(), "127.0.0.1:9100".into())];
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.dial("10.0.0.1:7100"), "127.0.0.1:9100");
        assert_eq!(config.dial("10.0.0.2:7100"), "10.0.0.2:7100");
    }

    fn two_stores() -> ProducerConfig {
        ProducerConfig::with_stores([
            StoreConfig::new("eu-1", ["127.0.0.1:7100", "127.0.0.1:7101"], 2),
            StoreConfig::new("eu-2", ["127.0.0.1:7200"], 1),
        ])
    }

    #[test]
    fn several_stores_are_valid_and_one_is_the_servers_store() {
        let config = two_stores();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.store_list().len(), 2);
        let one = ProducerConfig::new(["127.0.0.1:7100"]);
        let list = one.store_list();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].name.as_str(), list[0].weight, &list[0].servers),
            (DEFAULT_STORE_NAME, 1, &one.servers)
        );
        let mut retrying = two_stores();
        retrying.store_change_retry = true;
        assert_eq!(retrying.validate(), Ok(()));
    }

    #[test]
    fn bad_stores_are_refused_with_the_field_named() {
        let field = |change: fn(&mut ProducerConfig)| {
            let mut config = two_stores();
            change(&mut config);
            config.validate().map_err(|error| error.field)
        };
        let refused = |name: &str| Err(name.to_string());
        assert_eq!(
            field(|c| c.stores[1].weight = 0),
            refused("stores[1].weight")
        );
        assert_eq!(
            field(|c| c.stores[0].weight = STORE_WEIGHT_MAX + 1),
            refused("stores[0].weight")
        );
        assert_eq!(
            field(|c| c.stores[1].weight = u32::MAX),
            refused("stores[1].weight")
        );
        assert_eq!(
            field(|c| c.stores[0].servers.clear()),
            refused("stores[0].servers")
        );
        assert_eq!(
            field(|c| c.stores[1].servers.push("nohost".to_string())),
            refused("stores[1].servers[1]")
        );
        assert_eq!(
            field(|c| c.stores[1].name.clear()),
            refused("stores[1].name")
        );
        assert_eq!(
            field(|c| c.stores[1].name = "a b".to_string()),
            refused("stores[1].name")
        );
        // Duplicates: by name, by a shared server, by store id.
        assert_eq!(
            field(|c| c.stores[1].name = "eu-1".to_string()),
            refused("stores[1]")
        );
        assert_eq!(
            field(|c| c.stores[1].servers.push("127.0.0.1:7101".to_string())),
            refused("stores[1]")
        );
        assert_eq!(
            field(|c| {
                c.stores[0].store_id = 7;
                c.stores[1].store_id = 7;
            }),
            refused("stores[1]")
        );
        assert_eq!(
            field(|c| c.stores = vec![c.stores[0].clone(); STORES_MAX + 1]),
            refused("stores")
        );
        assert_eq!(
            field(|c| c.servers.push("127.0.0.1:1".to_string())),
            refused("servers")
        );
        assert_eq!(field(|c| c.store_id = 3), refused("store_id"));
        assert_eq!(
            field(|c| {
                c.store_change_retry = true;
                c.store_change_after = c.deadline;
            }),
            refused("store_change_after")
        );
        assert_eq!(
            field(|c| {
                c.store_change_retry = true;
                c.stores.pop();
            }),
            refused("store_change_retry")
        );
        let mut one = ProducerConfig::new(["127.0.0.1:7100"]);
        one.store_change_retry = true;
        assert_eq!(
            one.validate().map_err(|e| e.field),
            refused("store_change_retry")
        );
    }
}
