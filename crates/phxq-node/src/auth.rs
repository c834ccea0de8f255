//! Client authentication and authorization: signed tokens mapped to roles.
//!
//! A token is `phxq1.<claims>.<mac>`: `claims` is the base64url (no padding) of a small JSON
//! object `{"sub": subject, "roles": [role, ...], "exp": expiry in Unix ms}`, and `mac` the
//! base64url of HMAC-SHA256 over `phxq1.<claims>` keyed by the store's secret (32 random
//! bytes in a file, [`Secret`]). Self-contained: a node checks a token with the secret alone,
//! so expiry and forgery are real and no token list has to be replicated. The MAC is compared
//! in constant time (`hmac`'s `verify_slice`), before the claims are parsed, so nothing of a
//! forged token is ever read. Revocation is by expiry, or by a new secret (every token dies).
//!
//! Roles ([`Role`]): `admin` (everything), `produce:TOPIC`, `consume:TOPIC/GROUP`, where
//! TOPIC and GROUP are a name, `*` (any) or a prefix ending in `*` ([`Pattern`]). What each
//! call needs is an [`Action`]; [`Claims::allows`] decides.
//!
//! [`Verifier`] is what the server holds: the secret and a bounded cache of tokens it has
//! verified, so a client that sends the same token on every call pays the MAC once (the
//! expiry is still checked on every call).

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The first part of every token: the format's version.
pub const TOKEN_PREFIX: &str = "phxq1";
/// The longest token accepted, in bytes (a token rides in every call's metadata).
pub const TOKEN_BYTES_MAX: usize = 4096;
/// A store secret is exactly this many random bytes.
pub const SECRET_BYTES: usize = 32;
/// The longest subject, in bytes.
pub const SUBJECT_BYTES_MAX: usize = 128;
/// The most roles a token carries.
pub const ROLES_MAX: usize = 64;
/// Tokens a [`Verifier`] remembers as verified; beyond, the cache starts over.
pub const VERIFIED_TOKENS_MAX: usize = 4096;
/// Bytes of a MAC (HMAC-SHA256).
const MAC_BYTES: usize = 32;

/// Why a token was refused (the gRPC `UNAUTHENTICATED` of a call).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format: wrong parts, bad base64, bad claims, over a limit.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The MAC does not match: another store's secret, or altered claims.
    #[error("token signature does not match this store's secret (forged or of another store)")]
    Forged,
    /// Valid, but its time is over.
    #[error("token of {subject:?} expired at {expires_ms} ms (now {now_ms} ms)")]
    Expired {
        /// Whose token it was.
        subject: String,
        /// Its expiry, Unix ms.
        expires_ms: u64,
        /// The verifier's clock, Unix ms.
        now_ms: u64,
    },
}

fn malformed(why: impl Into<String>) -> TokenError {
    TokenError::Malformed(why.into())
}

// ---------------------------------------------------------------------------------------------
// The secret

/// A store's token secret. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Secret([u8; SECRET_BYTES]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret of these bytes.
    pub fn from_bytes(bytes: [u8; SECRET_BYTES]) -> Secret {
        Secret(bytes)
    }

    /// A new secret from the kernel's random source.
    pub fn generate() -> std::io::Result<Secret> {
        let mut bytes = [0; SECRET_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Secret(bytes))
    }

    /// Reads a secret file: exactly [`SECRET_BYTES`] bytes, else an error naming the file.
    pub fn load(path: &Path) -> Result<Secret, String> {
        let bytes = std::fs::read(path)
            .map_err(|error| format!("cannot read secret file {}: {error}", path.display()))?;
        let bytes: [u8; SECRET_BYTES] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            format!(
                "secret file {} holds {} bytes, not {SECRET_BYTES} (make one with `phxq token secret --out FILE`)",
                path.display(),
                bytes.len()
            )
        })?;
        Ok(Secret(bytes))
    }

    /// Writes a new secret to `path`, readable by its owner only; an existing file is never
    /// overwritten (every token of the old secret would die).
    pub fn create(path: &Path) -> Result<Secret, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let secret = Secret::generate().map_err(|error| format!("no random bytes: {error}"))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|error| format!("cannot create {}: {error}", path.display()))?;
        file.write_all(&secret.0)
            .and_then(|()| file.sync_all())
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
        Ok(secret)
    }

    /// The secret of `path`, created first if there is none (the dev store's).
    pub fn load_or_create(path: &Path) -> Result<Secret, String> {
        if path.exists() {
            Secret::load(path)
        } else {
            Secret::create(path)
        }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length")
    }
}

// ---------------------------------------------------------------------------------------------
// Roles

/// A topic or consumer group pattern: a name, `*`, or a prefix ending in `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Every name.
    Any,
    /// Names starting with this.
    Prefix(String),
    /// This name only.
    Exact(String),
}

impl Pattern {
    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
            Pattern::Exact(exact) => name == exact,
        }
    }
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Pattern, String> {
        if text == "*" {
            return Ok(Pattern::Any);
        }
        let (name, prefix) = match text.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (text, false),
        };
        phxq_types::validate_name(name).map_err(|error| format!("{text:?}: {error}"))?;
        Ok(if prefix {
            Pattern::Prefix(name.to_string())
        } else {
            Pattern::Exact(name.to_string())
        })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Prefix(prefix) => write!(f, "{prefix}*"),
            Pattern::Exact(name) => f.write_str(name),
        }
    }
}

/// What a token's holder may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything: topic changes, seeks, and every produce and consume.
    Admin,
    /// Produce to the matching topics.
    Produce {
        /// Which topics.
        topic: Pattern,
    },
    /// Consume, commit, receive, ack, nack and heartbeat as the matching consumer groups of
    /// the matching topics.
    Consume {
        /// Which topics.
        topic: Pattern,
        /// Which consumer groups.
        group: Pattern,
    },
}

impl FromStr for Role {
    type Err = String;

    /// `admin`, `produce:TOPIC` or `consume:TOPIC/GROUP`.
    fn from_str(text: &str) -> Result<Role, String> {
        let bad = || format!("role {text:?}: expected admin, produce:TOPIC or consume:TOPIC/GROUP");
        if text == "admin" {
            return Ok(Role::Admin);
        }
        if let Some(topic) = text.strip_prefix("produce:") {
            return Ok(Role::Produce {
                topic: topic.parse()?,
            });
        }
        let (topic, group) = text
            .strip_prefix("consume:")
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(bad)?;
        Ok(Role::Consume {
            topic: topic.parse()?,
            group: group.parse()?,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Admin => f.write_str("admin"),
            Role::Produce { topic } => write!(f, "produce:{topic}"),
            Role::Consume { topic, group } => write!(f, "consume:{topic}/{group}"),
        }
    }
}

/// What a call needs permission for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Topic changes, seeks: `admin` only.
    Admin,
    /// Appending to a topic.
    Produce {
        /// The topic.
        topic: &'a str,
    },
    /// Reading or moving a consumer group's place in a topic.
    Consume {
        /// The topic.
        topic: &'a str,
        /// The consumer group.
        group: &'a str,
    },
    /// Looking up a topic's offsets (no group named): any consume role on the topic.
    ReadTopic {
        /// The topic.
        topic: &'a str,
    },
}

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Admin => f.write_str("admin"),
            Action::Produce { topic } => write!(f, "produce:{topic}"),
            Action::Consume { topic, group } => write!(f, "consume:{topic}/{group}"),
            Action::ReadTopic { topic } => write!(f, "consume:{topic}/*"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Claims and tokens

/// Who a token speaks for, what it may do, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Whose token it is (for logs and people): 1 to [`SUBJECT_BYTES_MAX`] bytes.
    pub subject: String,
    /// 1 to [`ROLES_MAX`] roles.
    pub roles: Vec<Role>,
    /// Unix ms after which the token is refused.
    pub expires_ms: u64,
}

/// The claims as written in a token.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireClaims {
    sub: String,
    roles: Vec<String>,
    exp: u64,
}

impl Claims {
    /// Whether any role allows `action`.
    pub fn allows(&self, action: Action<'_>) -> bool {
        self.roles.iter().any(|role| match (role, action) {
            (Role::Admin, _) => true,
            (Role::Produce { topic }, Action::Produce { topic: name }) => topic.matches(name),
            (Role::Consume { topic, group }, Action::Consume { topic: t, group: g }) => {
                topic.matches(t) && group.matches(g)
            }
            (Role::Consume { topic, .. }, Action::ReadTopic { topic: t }) => topic.matches(t),
            _ => false,
        })
    }

    /// Whether the token holds the `admin` role.
    pub fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    /// Checks the limits: subject and role count.
    pub fn validate(&self) -> Result<(), String> {
        if self.subject.is_empty() || self.subject.len() > SUBJECT_BYTES_MAX {
            return Err(format!(
                "subject must be 1 to {SUBJECT_BYTES_MAX} bytes, not {}",
                self.subject.len()
            ));
        }
        if self.roles.is_empty() || self.roles.len() > ROLES_MAX {
            return Err(format!(
                "a token holds 1 to {ROLES_MAX} roles, not {}",
                self.roles.len()
            ));
        }
        Ok(())
    }
}

/// A token of `claims` signed with `secret`; `Err` if the claims break a limit.
pub fn issue(secret: &Secret, claims: &Claims) -> Result<String, String> {
    claims.validate()?;
    let wire = WireClaims {
        sub: claims.subject.clone(),
        roles: claims.roles.iter().map(ToString::to_string).collect(),
        exp: claims.expires_ms,
    };
    let json = serde_json::to_vec(&wire).expect("claims serialize");
    let signed = format!("{TOKEN_PREFIX}.{}", URL_SAFE_NO_PAD.encode(json));
    let mut mac = secret.mac();
    mac.update(signed.as_bytes());
    let token = format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    );
    if token.len() > TOKEN_BYTES_MAX {
        return Err(format!(
            "the token would be {} bytes, over {TOKEN_BYTES_MAX}",
            token.len()
        ));
    }
    Ok(token)
}

/// The claims of `token` if `secret` signed it and it is not expired at `now_ms`.
pub fn verify(secret: &Secret, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
    let claims = verify_signed(secret, token)?;
    check_expiry(&claims, now_ms)?;
    Ok(claims)
}

/// The claims of `token` if `secret` signed it (expiry not checked).
fn verify_signed(secret: &Secret, token: &str) -> Result<Claims, TokenError> {
    if token.len() > TOKEN_BYTES_MAX {
        return Err(malformed(format!("over {TOKEN_BYTES_MAX} bytes")));
    }
    let (signed, mac_text) = token
        .rsplit_once('.')
        .ok_or_else(|| malformed("expected phxq1.<claims>.<signature>"))?;
    let claims_text = signed
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.strip_prefix('.'))
        .filter(|rest| !rest.contains('.'))
        .ok_or_else(|| malformed("expected phxq1.<claims>.<signature>"))?;
    let tag = URL_SAFE_NO_PAD
        .decode(mac_text)
        .map_err(|error| malformed(format!("signature: {error}")))?;
    if tag.len() != MAC_BYTES {
        return Err(malformed(format!(
            "signature of {} bytes, not {MAC_BYTES}",
            tag.len()
        )));
    }
    let mut mac = secret.mac();
    mac.update(signed.as_bytes());
    mac.verify_slice(&tag).map_err(|_| TokenError::Forged)?;
    // Signed by this store's secret: the claims are ours, but still checked as input (a
    // token issued by an older build must not panic a newer node).
    let json = URL_SAFE_NO_PAD
        .decode(claims_text)
        .map_err(|error| malformed(format!("claims: {error}")))?;
    let wire: WireClaims =
        serde_json::from_slice(&json).map_err(|error| malformed(format!("claims: {error}")))?;
    let roles = wire
        .roles
        .iter()
        .map(|role| role.parse())
        .collect::<Result<Vec<Role>, String>>()
        .map_err(malformed)?;
    let claims = Claims {
        subject: wire.sub,
        roles,
        expires_ms: wire.exp,
    };
    claims.validate().map_err(malformed)?;
    Ok(claims)
}

fn check_expiry(claims: &Claims, now_ms: u64) -> Result<(), TokenError> {
    if now_ms >= claims.expires_ms {
        return Err(TokenError::Expired {
            subject: claims.subject.clone(),
            expires_ms: claims.expires_ms,
            now_ms,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The server's verifier

/// The secret and the tokens already verified with it, shared by every call of a node.
#[derive(Debug)]
pub struct Verifier {
    secret: Secret,
    /// Tokens whose MAC checked out, with their claims. Bounded by [`VERIFIED_TOKENS_MAX`];
    /// only tokens this store signed get in, so a flood of forged tokens cannot evict anyone
    /// (and costs each one MAC).
    verified: Mutex<HashMap<String, Arc<Claims>>>,
}

impl Verifier {
    /// A verifier of tokens signed with `secret`.
    pub fn new(secret: Secret) -> Verifier {
        Verifier {
            secret,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The claims of `token` at `now_ms`, from the cache when it was verified before.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Arc<Claims>, TokenError> {
        let cached = self.lock().get(token).cloned();
        let claims = match cached {
            Some(claims) => claims,
            None => {
                let claims = Arc::new(verify_signed(&self.secret, token)?);
                let mut verified = self.lock();
                if verified.len() >= VERIFIED_TOKENS_MAX {
                    verified.clear();
                }
                verified.insert(token.to_string(), claims.clone());
                claims
            }
        };
        check_expiry(&claims, now_ms)?;
        Ok(claims)
    }

    /// How many tokens are cached (tests).
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Claims>>> {
        // Every critical section is one map operation: a poisoned lock guards a whole map.
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
