//! The consumer's effective settings: the operator's per consumer group settings from the
//! store over the library's [`ConsumerConfig`].
//!
//! A topic's config carries, per consumer group, retry tiers, a dead-letter topic, rate limits
//! and a max in flight (`phxq topic alter NAME --settings-for GROUP ...`). The store validates
//! and replicates them but does not act on them; a consumer reads them from `ClusterStatus`
//! when [`Consumer::run`](crate::Consumer::run) starts, and again every
//! [`ConsumerConfig::settings_refresh`] while it runs, and computes what to apply here. Pure: a function
//! of the library config and the store's settings.
//!
//! **Precedence, field by field: the store's setting wins when it has one**, else the library
//! value stays. A library value the store overrides is ignored (not combined); the effective
//! values are logged at start and reported ([`ConsumerReport::settings`]).
//!
//! * retry tiers (a non-empty list) replace [`ConsumerConfig::retry_tiers`];
//! * the dead-letter topic replaces [`ConsumerConfig::dead_letter_topic`];
//! * max in flight replaces [`ConsumerConfig::max_in_flight`];
//! * the rates are **per consumer group**. With live membership they replace
//!   [`Membership::group_messages_per_s_max`] / [`Membership::group_bytes_per_s_max`]
//!   (divided among the live members) and the member's own
//!   [`ConsumerConfig::messages_per_s_max`] / [`ConsumerConfig::bytes_per_s_max`] are
//!   dropped, so the store's rate is the only one of its kind. With a static member list,
//!   each consumer takes the rate divided by the list's length (at least 1; an empty list is
//!   one consumer reading everything) as its `messages_per_s_max` / `bytes_per_s_max`.
//!
//! The result is checked with [`ConsumerConfig::validate`]; a store setting the library
//! cannot accept (the store allows delays up to a week and 1,000,000 in flight, the library
//! [`RETRY_DELAY_MAX`](crate::RETRY_DELAY_MAX) and
//! [`MAX_IN_FLIGHT_LIMIT`](crate::MAX_IN_FLIGHT_LIMIT)) is a [`SettingsError`] naming it,
//! before anything is consumed. While running, a changed setting that fails the same way is
//! logged and ignored (the consumer keeps the settings in force).
//!
//! [`ConsumerReport::settings`]: crate::ConsumerReport::settings
//! [`Membership::group_messages_per_s_max`]: crate::Membership::group_messages_per_s_max
//! [`Membership::group_bytes_per_s_max`]: crate::Membership::group_bytes_per_s_max

use std::time::Duration;

use phxq_proto::api;

use crate::consumer_config::{ConsumerConfig, ConsumerConfigError, RetryTier};

/// The settings a running consumer applies, after the store's settings (if any) were laid
/// over its [`ConsumerConfig`]. Reported in [`ConsumerReport::settings`](crate::ConsumerReport::settings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EffectiveSettings {
    /// Whether the store had settings for this (topic, consumer group).
    pub from_store: bool,
    /// The redelivery schedule.
    pub retry_tiers: Vec<RetryTier>,
    /// Where messages go once the tiers are spent.
    pub dead_letter_topic: Option<String>,
    /// Most messages handled at once by this consumer.
    pub max_in_flight: usize,
    /// This consumer's own messages/s limit.
    pub messages_per_s_max: Option<u32>,
    /// This consumer's own bytes/s limit.
    pub bytes_per_s_max: Option<u64>,
    /// With live membership, the group's messages/s, divided among the live members.
    pub group_messages_per_s_max: Option<u32>,
    /// With live membership, the group's bytes/s, divided among the live members.
    pub group_bytes_per_s_max: Option<u64>,
}

impl EffectiveSettings {
    /// The settings `config` applies.
    pub(crate) fn of(config: &ConsumerConfig, from_store: bool) -> EffectiveSettings {
        let membership = config.membership.as_ref();
        EffectiveSettings {
            from_store,
            retry_tiers: config.retry_tiers.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            max_in_flight: config.max_in_flight,
            messages_per_s_max: config.messages_per_s_max,
            bytes_per_s_max: config.bytes_per_s_max,
            group_messages_per_s_max: membership.and_then(|m| m.group_messages_per_s_max),
            group_bytes_per_s_max: membership.and_then(|m| m.group_bytes_per_s_max),
        }
    }
}

/// A store setting of the consumer's (topic, consumer group) that the library cannot apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("store settings of topic {topic:?} for consumer group {consumer_group:?}: {error}")]
pub struct SettingsError {
    /// The topic.
    pub topic: String,
    /// The consumer group.
    pub consumer_group: String,
    /// The setting at fault, named as the [`ConsumerConfig`] field it would set
    /// (`retry_tiers[0].delay`, `max_in_flight`, ...), and why.
    pub error: ConsumerConfigError,
}

/// `config` with the store's `settings` laid over it (see the module documentation),
/// validated.
pub(crate) fn effective(
    config: &ConsumerConfig,
    settings: Option<&api::ConsumerGroupSettings>,
) -> Result<ConsumerConfig, SettingsError> {
    let Some(settings) = settings else {
        return Ok(config.clone());
    };
    let fail = |error: ConsumerConfigError| SettingsError {
        topic: config.topic.clone(),
        consumer_group: config.consumer_group.clone(),
        error,
    };
    let mut effective = config.clone();
    if !settings.retry_tiers.is_empty() {
        effective.retry_tiers = settings
            .retry_tiers
            .iter()
            .map(|tier| RetryTier {
                attempts: tier.attempts,
                delay: Duration::from_millis(tier.delay_ms),
            })
            .collect();
    }
    if let Some(topic) = &settings.dead_letter_topic {
        effective.dead_letter_topic = Some(topic.clone());
    }
    if let Some(max_in_flight) = settings.max_in_flight {
        // Beyond usize (not on 32- or 64-bit targets): refused by validate below anyway.
        effective.max_in_flight = usize::try_from(max_in_flight).unwrap_or(usize::MAX);
    }
    let members = config.members.len().max(1) as u64;
    if let Some(rate) = settings.rate_messages_per_s {
        let rate = u32::try_from(rate).map_err(|_| {
            fail(ConsumerConfigError {
                field: "messages_per_s_max".into(),
                reason: format!("{rate}; at most {}", u32::MAX),
            })
        })?;
        match &mut effective.membership {
            Some(membership) => {
                membership.group_messages_per_s_max = Some(rate);
                effective.messages_per_s_max = None;
            }
            None => effective.messages_per_s_max = Some((rate / members as u32).max(1)),
        }
    }
    if let Some(rate) = settings.rate_bytes_per_s {
        match &mut effective.membership {
            Some(membership) => {
                membership.group_bytes_per_s_max = Some(rate);
                effective.bytes_per_s_max = None;
            }
            None => effective.bytes_per_s_max = Some((rate / members).max(1)),
        }
    }
    effective.validate().map_err(fail)?;
    Ok(effective)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer_member::Membership;

    fn library() -> ConsumerConfig {
        let mut config = ConsumerConfig::new(["127.0.0.1:7100"], "orders", "audit");
        config.messages_per_s_max = Some(500);
        config.bytes_per_s_max = Some(50_000);
        config
    }

    fn store() -> api::ConsumerGroupSettings {
        api::ConsumerGroupSettings {
            consumer_group: "audit".into(),
            retry_tiers: vec![api::RetryTier {
                attempts: 2,
                delay_ms: 50,
            }],
            dead_letter_topic: Some("orders-dead".into()),
            rate_messages_per_s: Some(300),
            rate_bytes_per_s: Some(9_000),
            max_in_flight: Some(1),
        }
    }

    #[test]
    fn without_store_settings_the_library_config_stays() {
        let config = library();
        assert_eq!(effective(&config, None), Ok(config.clone()));
        let empty = api::ConsumerGroupSettings {
            consumer_group: "audit".into(),
            ..Default::default()
        };
        assert_eq!(effective(&config, Some(&empty)), Ok(config));
    }

    #[test]
    fn store_settings_win_and_a_static_list_divides_the_group_rate() {
        let mut config = library();
        config.members = vec!["a".into(), "b".into(), "c".into()];
        config.member = "b".into();
        let got = effective(&config, Some(&store())).expect("valid");
        assert_eq!(
            got.retry_tiers,
            [RetryTier {
                attempts: 2,
                delay: Duration::from_millis(50)
            }]
        );
        assert_eq!(got.dead_letter_topic.as_deref(), Some("orders-dead"));
        assert_eq!(got.max_in_flight, 1);
        assert_eq!(got.messages_per_s_max, Some(100));
        assert_eq!(got.bytes_per_s_max, Some(3_000));
    }

    #[test]
    fn with_live_membership_the_store_rate_is_the_group_rate_only() {
        let mut config = library();
        config.membership = Some(Membership::new("m1"));
        let got = effective(&config, Some(&store())).expect("valid");
        let membership = got.membership.expect("kept");
        assert_eq!(membership.group_messages_per_s_max, Some(300));
        assert_eq!(membership.group_bytes_per_s_max, Some(9_000));
        assert_eq!((got.messages_per_s_max, got.bytes_per_s_max), (None, None));
    }

    #[test]
    fn a_store_setting_the_library_refuses_is_named() {
        let field = |change: fn(&mut api::ConsumerGroupSettings)| {
            let mut settings = store();
            change(&mut settings);
            effective(&library(), Some(&settings)).map_err(|error| error.error.field)
        };
        assert_eq!(
            field(|s| s.retry_tiers[0].delay_ms = 7_200_000),
            Err("retry_tiers[0].delay".to_string())
        );
        assert_eq!(
            field(|s| s.max_in_flight = Some(1_000_000)),
            Err("max_in_flight".to_string())
        );
        assert_eq!(
            field(|s| s.rate_messages_per_s = Some(u64::from(u32::MAX) + 1)),
            Err("messages_per_s_max".to_string())
        );
        assert_eq!(
            field(|s| s.dead_letter_topic = Some("orders".into())),
            Err("dead_letter_topic".to_string())
        );
    }
}
