//! The client service's gate: who is calling (once per call, before its request is read)
//! and whether they may (per request, before anything reaches the event loop).
//!
//! [`authenticate`] runs as a tonic interceptor on every call: it reads the `authorization:
//! Bearer <token>` metadata, verifies the token with the store's [`Verifier`] (cached: one
//! MAC per distinct token) and puts the [`Caller`] in the call's extensions; a missing or bad
//! token ends the call with `UNAUTHENTICATED` before its body is decoded. A `ProduceStream`
//! is one call, so its token is verified once for all its produces. Each handler then asks
//! [`Caller::check`] for the [`Action`] its request needs, and answers `PERMISSION_DENIED`
//! without submitting anything when the token's roles do not allow it.
//!
//! With auth off (no `[auth]` in the config) every caller is [`Caller::Anyone`], allowed
//! everything, as before auth existed.

use std::sync::Arc;

use phxq_proto::api;
use phxq_types::ErrorCode;

use crate::auth::{Action, Claims, Verifier};

/// Who is calling, as the interceptor found out.
#[derive(Clone, Debug)]
pub(crate) enum Caller {
    /// Auth is off: anyone may do anything.
    Anyone,
    /// The verified claims of the call's token.
    Token(Arc<Claims>),
}

impl Caller {
    /// `Ok` when the caller may do `action`, else the `PERMISSION_DENIED` status.
    pub(crate) fn check(&self, action: Action<'_>) -> Result<(), tonic::Status> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Token(claims) if claims.allows(action) => Ok(()),
            Caller::Token(claims) => Err(api::refusal_status(
                ErrorCode::PermissionDenied,
                format!(
                    "the token of {:?} (roles: {}) does not allow {action}",
                    claims.subject,
                    roles_text(claims)
                ),
            )),
        }
    }

    /// `Ok` when the caller may do `action`, else the refusal as a response's `Error` (for
    /// one request of a `ProduceStream`, whose other requests go on).
    pub(crate) fn check_wire(&self, action: Action<'_>) -> Result<(), api::Error> {
        self.check(action).map_err(|status| {
            let failure = api::status_failure(&status).expect("a refusal status");
            api::Error::from(&failure)
        })
    }

    /// Whether the caller sees everything (peer addresses, counters).
    pub(crate) fn is_admin(&self) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Token(claims) => claims.is_admin(),
        }
    }
}

fn roles_text(claims: &Claims) -> String {
    let roles: Vec<String> = claims.roles.iter().map(ToString::to_string).collect();
    roles.join(", ")
}

/// The caller of `request`, as [`authenticate`] left it. A call that did not pass the
/// interceptor has no caller and is refused (fail closed).
pub(crate) fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| {
            api::refusal_status(ErrorCode::Unauthenticated, "the call was not authenticated")
        })
}

/// The interceptor: `request` with its [`Caller`], or `UNAUTHENTICATED`. `verifier` is
/// `None` with auth off.
pub(crate) fn authenticate(
    verifier: Option<&Verifier>,
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    let caller = match verifier {
        None => Caller::Anyone,
        Some(verifier) => {
            let token = bearer_token(&request)?;
            let claims = verifier
                .verify(token, super::wall_ms())
                .map_err(|error| api::refusal_status(ErrorCode::Unauthenticated, error))?;
            Caller::Token(claims)
        }
    };
    request.extensions_mut().insert(caller);
    Ok(request)
}

/// The token of the `authorization: Bearer <token>` metadata.
fn bearer_token<T>(request: &tonic::Request<T>) -> Result<&str, tonic::Status> {
    let refuse = |why: &str| api::refusal_status(ErrorCode::Unauthenticated, why);
    let value = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| refuse("no token: send metadata `authorization: Bearer <token>`"))?;
    let text = value
        .to_str()
        .map_err(|_| refuse("the authorization metadata is not ASCII"))?;
    text.strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| refuse("the authorization metadata is not `Bearer <token>`"))
}
