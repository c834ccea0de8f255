use super::*;

const NOW_MS: u64 = 1_800_000_000_000;

fn secret(byte: u8) -> Secret {
    Secret::from_bytes([byte; SECRET_BYTES])
}

fn claims(roles: &[&str]) -> Claims {
    Claims {
        subject: "alice".to_string(),
        roles: roles.iter().map(|r| r.parse().unwrap()).collect(),
        expires_ms: NOW_MS + 60_000,
    }
}

#[test]
fn a_token_verifies_with_its_secret_and_gives_back_its_claims() {
    let claims = claims(&[
        "admin",
        "produce:orders",
        "consume:orders/billing",
        "consume:*/a*",
    ]);
    let token = issue(&secret(1), &claims).unwrap();
    assert!(token.starts_with("phxq1."));
    assert_eq!(verify(&secret(1), &token, NOW_MS).unwrap(), claims);
}

#[test]
fn another_stores_secret_is_forged() {
    let token = issue(&secret(1), &claims(&["admin"])).unwrap();
    assert_eq!(verify(&secret(2), &token, NOW_MS), Err(TokenError::Forged));
}

#[test]
fn an_expired_token_is_refused_from_its_expiry_on() {
    let token = issue(&secret(1), &claims(&["admin"])).unwrap();
    assert!(verify(&secret(1), &token, NOW_MS + 59_999).is_ok());
    assert!(matches!(
        verify(&secret(1), &token, NOW_MS + 60_000),
        Err(TokenError::Expired { .. })
    ));
}

/// Every byte changed to every other token character is refused: the MAC covers the whole
/// signed part, and a changed signature never matches.
#[test]
fn tampering_with_any_byte_is_refused() {
    let token = issue(&secret(1), &claims(&["produce:orders"])).unwrap();
    let bytes = token.as_bytes();
    for at in 0..bytes.len() {
        for replacement in [b'A', b'b', b'.', b'-', b'_', b'9'] {
            if bytes[at] == replacement {
                continue;
            }
            let mut changed = bytes.to_vec();
            changed[at] = replacement;
            let changed = String::from_utf8(changed).unwrap();
            // The last base64 character carries padding bits: some changes there decode
            // to the same bytes, and so are the same token.
            if at == bytes.len() - 1
                && URL_SAFE_NO_PAD.decode(&changed[changed.len() - 43..]).ok()
                    == URL_SAFE_NO_PAD.decode(&token[token.len() - 43..]).ok()
            {
                continue;
            }
            assert!(
                verify(&secret(1), &changed, NOW_MS).is_err(),
                "byte {at} set to {:?} was accepted",
                replacement as char
            );
        }
    }
}

#[test]
fn claims_rewritten_without_the_secret_are_forged() {
    let token = issue(&secret(1), &claims(&["produce:orders"])).unwrap();
    let admin = issue(&secret(9), &claims(&["admin"])).unwrap();
    let mac = token.rsplit_once('.').unwrap().1;
    let (signed, _) = admin.rsplit_once('.').unwrap();
    let spliced = format!("{signed}.{mac}");
    assert_eq!(
        verify(&secret(1), &spliced, NOW_MS),
        Err(TokenError::Forged)
    );
}

#[test]
fn malformed_tokens_are_refused_as_malformed() {
    let good = issue(&secret(1), &claims(&["admin"])).unwrap();
    let long = "a".repeat(TOKEN_BYTES_MAX + 1);
    let (signed, mac) = good.rsplit_once('.').unwrap();
    for bad in [
        "",
        "phxq1",
        "phxq1..",
        "phxq2.e30.AAAA",
        &long,
        &format!("{signed}.{}", &mac[..20]),
        &format!("{signed}.x.{mac}"),
        &format!("{signed}.{mac}!"),
    ] {
        assert!(
            matches!(
                verify(&secret(1), bad, NOW_MS),
                Err(TokenError::Malformed(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn roles_parse_and_print_alike_and_bad_ones_are_refused() {
    for text in [
        "admin",
        "produce:orders",
        "produce:*",
        "consume:or*/g1",
        "consume:*/*",
    ] {
        assert_eq!(text.parse::<Role>().unwrap().to_string(), text);
    }
    for bad in [
        "",
        "root",
        "produce:",
        "produce:a b",
        "consume:orders",
        "consume:/g",
        "consume:t/",
        "produce:**",
    ] {
        assert!(bad.parse::<Role>().is_err(), "{bad:?}");
    }
}

#[test]
fn each_role_allows_its_actions_only() {
    let producer = claims(&["produce:orders"]);
    assert!(producer.allows(Action::Produce { topic: "orders" }));
    assert!(!producer.allows(Action::Produce { topic: "orders2" }));
    assert!(!producer.allows(Action::Consume {
        topic: "orders",
        group: "g"
    }));
    assert!(!producer.allows(Action::ReadTopic { topic: "orders" }));
    assert!(!producer.allows(Action::Admin));

    let consumer = claims(&["consume:orders/bill*"]);
    assert!(consumer.allows(Action::Consume {
        topic: "orders",
        group: "billing"
    }));
    assert!(!consumer.allows(Action::Consume {
        topic: "orders",
        group: "audit"
    }));
    assert!(!consumer.allows(Action::Consume {
        topic: "other",
        group: "billing"
    }));
    assert!(consumer.allows(Action::ReadTopic { topic: "orders" }));
    assert!(!consumer.allows(Action::Produce { topic: "orders" }));
    assert!(!consumer.allows(Action::Admin));
    assert!(!consumer.is_admin());

    let admin = claims(&["admin"]);
    assert!(admin.is_admin());
    for action in [
        Action::Admin,
        Action::Produce { topic: "x" },
        Action::Consume {
            topic: "x",
            group: "y",
        },
        Action::ReadTopic { topic: "x" },
    ] {
        assert!(admin.allows(action));
    }
}

#[test]
fn claims_over_a_limit_are_not_issued() {
    let mut many = claims(&["admin"]);
    many.roles = vec![Role::Admin; ROLES_MAX + 1];
    assert!(issue(&secret(1), &many).is_err());
    let mut none = claims(&["admin"]);
    none.roles.clear();
    assert!(issue(&secret(1), &none).is_err());
    let mut nameless = claims(&["admin"]);
    nameless.subject.clear();
    assert!(issue(&secret(1), &nameless).is_err());
}

#[test]
fn the_verifier_caches_good_tokens_only_and_still_checks_expiry() {
    let verifier = Verifier::new(secret(1));
    let token = issue(&secret(1), &claims(&["admin"])).unwrap();
    assert!(verifier.verify(&token, NOW_MS).is_ok());
    assert!(verifier.verify(&token, NOW_MS).is_ok());
    assert_eq!(verifier.cached(), 1);
    assert!(matches!(
        verifier.verify(&token, NOW_MS + 60_000),
        Err(TokenError::Expired { .. })
    ));
    let forged = issue(&secret(2), &claims(&["admin"])).unwrap();
    assert_eq!(verifier.verify(&forged, NOW_MS), Err(TokenError::Forged));
    assert_eq!(verifier.cached(), 1);
    for i in 0..VERIFIED_TOKENS_MAX + 10 {
        let mut other = claims(&["admin"]);
        other.subject = format!("s{i}");
        verifier
            .verify(&issue(&secret(1), &other).unwrap(), NOW_MS)
            .unwrap();
    }
    assert!(verifier.cached() <= VERIFIED_TOKENS_MAX);
}

#[test]
fn secret_files_must_hold_exactly_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.secret");
    let made = Secret::create(&path).unwrap();
    assert!(
        Secret::create(&path).is_err(),
        "an existing secret is never replaced"
    );
    let loaded = Secret::load_or_create(&path).unwrap();
    assert_eq!(made.0, loaded.0);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "readable by its owner only");
    std::fs::write(&path, [7u8; SECRET_BYTES - 1]).unwrap();
    assert!(Secret::load(&path).unwrap_err().contains("31 bytes"));
}
