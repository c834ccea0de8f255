//! Why a send failed: [`ProduceError`].
//!
//! The three kinds of failure of the style guide, seen from a client: a refusal with a stable
//! code that retrying cannot change comes back at once ([`ErrorKind::Refused`]); trouble that
//! retrying may cure (elections, overload, lost connections) is retried until the deadline
//! and then reported with what the last attempt met ([`ErrorKind::DeadlineExceeded`],
//! [`ErrorKind::Unreachable`]); an exchange that makes no sense is
//! [`ErrorKind::Protocol`].

use std::fmt;
use std::sync::Arc;

use phxq_proto::api::Failure;
use phxq_types::ErrorCode;

/// What kind of failure a [`ProduceError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A node refused the request with a code retrying cannot change (`UNKNOWN_TOPIC`,
    /// `MESSAGE_TOO_LARGE`, `INVALID_NAME`, `WRONG_STORE`, ...; [`ProduceError::code`]), or
    /// the producer refused it before sending, with the code a node would have used. Nothing
    /// was stored by the refused attempt.
    Refused,
    /// The deadline passed while retrying; the last attempt was refused with a retryable code
    /// (`NO_MASTER`, `BUSY`, ...; [`ProduceError::code`]).
    DeadlineExceeded,
    /// The deadline passed while retrying; the last attempt reached no node or had no answer
    /// in time (a transport failure; [`ProduceError::code`] is `None`).
    Unreachable,
    /// The exchange failed in a way retrying cannot fix: a gRPC status such as a size limit,
    /// or an answer that does not match the request (a bug in the node or this client).
    Protocol,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Refused => "refused",
            ErrorKind::DeadlineExceeded => "deadline exceeded",
            ErrorKind::Unreachable => "store unreachable",
            ErrorKind::Protocol => "protocol error",
        })
    }
}

/// Why a message was not acknowledged.
///
/// When [`ProduceError::maybe_stored`] is true, an attempt ended in a way that leaves its
/// outcome unknown (`INDETERMINATE`, `TIMEOUT`, a lost connection, no answer in time) and
/// the message may be stored anyway; sending it again may store it twice (at-least-once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceError {
    kind: ErrorKind,
    code: Option<ErrorCode>,
    message: String,
    attempts: u32,
    maybe_stored: bool,
    /// The store the failure happened in, for a producer of several stores.
    store: Option<Arc<str>>,
}

impl ProduceError {
    /// An error of `kind` with the phxq `code` (if any) and an explanation.
    pub(crate) fn new(
        kind: ErrorKind,
        code: Option<ErrorCode>,
        message: impl Into<String>,
    ) -> Self {
        ProduceError {
            kind,
            code,
            message: message.into(),
            attempts: 0,
            maybe_stored: false,
            store: None,
        }
    }

    /// A refusal with `code`, made by the producer itself before sending.
    pub(crate) fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        ProduceError::new(ErrorKind::Refused, Some(code), message)
    }

    /// The error for a node's `failure`: refused, or past the deadline when retryable.
    pub(crate) fn from_failure(failure: &Failure) -> Self {
        let kind = if failure.is_retryable() {
            ErrorKind::DeadlineExceeded
        } else {
            ErrorKind::Refused
        };
        let message = match failure.code {
            Some(_) => failure.message.clone(),
            // Keep the number of a code this build does not know.
            None => failure.to_string(),
        };
        ProduceError::new(kind, failure.code, message)
    }

    /// Records how many calls the request made and whether one may have stored it.
    pub(crate) fn after(mut self, attempts: u32, maybe_stored: bool) -> Self {
        self.attempts = attempts;
        self.maybe_stored = maybe_stored;
        self
    }

    /// Names the store the failure happened in (producers of several stores).
    pub(crate) fn in_store(mut self, store: Arc<str>) -> Self {
        self.store = Some(store);
        self
    }

    /// The store the failure happened in, when the producer writes to several stores
    /// (`None` with one store: there is no other).
    pub fn store(&self) -> Option<&str> {
        self.store.as_deref()
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The phxq error code: the refusal's code, or for [`ErrorKind::DeadlineExceeded`] the
    /// last retryable code met. `None` for transport and protocol failures, and for a code
    /// this build does not know (its number is then in the message).
    pub fn code(&self) -> Option<ErrorCode> {
        self.code
    }

    /// The node's explanation (or the producer's, or the transport's), for people; do not
    /// parse it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// How many calls to nodes the request made: sends and redirects, and the
    /// `ClusterStatus` calls that learnt the store's layout for it. 0 when the producer
    /// refused the request before calling anyone.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether an attempt ended without a known outcome, so the message may have been stored
    /// despite this error (see the type's documentation).
    pub fn maybe_stored(&self) -> bool {
        self.maybe_stored
    }
}

impl fmt::Display for ProduceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(store) = &self.store {
            write!(f, "store {store:?}: ")?;
        }
        write!(f, "{}", self.kind)?;
        if let Some(code) = self.code {
            write!(f, ": {code}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        write!(f, " (after {} attempt(s)", self.attempts)?;
        if self.maybe_stored {
            write!(f, "; the messages may have been stored")?;
        }
        write!(f, ")")
    }
}

impl std::error::Error for ProduceError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(number: u32) -> Failure {
        Failure {
            code: ErrorCode::from_number(number),
            number,
            message: "why".to_string(),
            master_addr: None,
        }
    }

    #[test]
    fn retryable_codes_exceed_the_deadline_and_the_others_are_refusals() {
        for code in ErrorCode::ALL {
            let error = ProduceError::from_failure(&failure(code.number()));
            assert_eq!(error.code(), Some(code));
            let expected = if code.is_retryable() {
                ErrorKind::DeadlineExceeded
            } else {
                ErrorKind::Refused
            };
            assert_eq!(error.kind(), expected, "{code}");
        }
        let future = ProduceError::from_failure(&failure(9999));
        assert_eq!(
            (future.kind(), future.code(), future.message()),
            (ErrorKind::Refused, None, "UNKNOWN(9999): why")
        );
    }

    #[test]
    fn the_display_says_kind_code_message_and_attempts() {
        let error = ProduceError::from_failure(&failure(3)).after(1, false);
        assert_eq!(
            error.to_string(),
            "refused: UNKNOWN_TOPIC(3): why (after 1 attempt(s))"
        );
        let error =
            ProduceError::new(ErrorKind::Unreachable, None, "connection refused").after(7, true);
        assert_eq!(
            error.to_string(),
            "store unreachable: connection refused (after 7 attempt(s); \
             the messages may have been stored)"
        );
        let error = error.in_store(Arc::from("eu-2"));
        assert_eq!(error.store(), Some("eu-2"));
        assert!(
            error
                .to_string()
                .starts_with("store \"eu-2\": store unreachable: "),
            "{error}"
        );
    }
}
