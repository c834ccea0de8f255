//! `phxq token secret|issue`: a store's token secret, and tokens signed with it.
//!
//! A token is self-contained (`phxq_node::auth`): whoever holds the secret file can issue
//! one; a node checks it with the same file (`[auth] secret_file`). Tokens are revoked by
//! their expiry, or all at once by a new secret.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use phxq_node::auth::{Claims, Role, Secret, issue};

use crate::{CommandResult, print_line};

/// The longest `--ttl`: ten years, in seconds.
const TTL_S_MAX: u64 = 10 * 366 * 24 * 3600;

/// Arguments of `phxq token secret`.
#[derive(Debug, clap::Args)]
pub struct SecretArgs {
    /// Where to write the new secret (32 random bytes, mode 0600); an existing file is
    /// never overwritten.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Arguments of `phxq token issue`.
#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The store's secret file (the nodes' `[auth] secret_file`).
    #[arg(long, value_name = "FILE")]
    secret_file: PathBuf,
    /// Whose token it is (shown in refusals and logs).
    #[arg(long)]
    subject: String,
    /// A role, repeated: admin, produce:TOPIC or consume:TOPIC/GROUP; TOPIC and GROUP are a
    /// name, * or a prefix ending in *.
    #[arg(long = "role", value_name = "ROLE", required = true)]
    roles: Vec<String>,
    /// How long the token is valid: a number with s, m, h or d (e.g. 30d).
    #[arg(long, default_value = "30d")]
    ttl: String,
}

pub fn secret(args: &SecretArgs) -> CommandResult {
    Secret::create(&args.out)?;
    eprintln!(
        "phxq token: wrote a new store secret to {} (give it to every node as [auth] secret_file)",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run_issue(args: &IssueArgs) -> CommandResult {
    let secret = Secret::load(&args.secret_file)?;
    let roles = args
        .roles
        .iter()
        .map(|role| role.parse::<Role>())
        .collect::<Result<Vec<_>, _>>()?;
    let ttl_ms = ttl_s(&args.ttl)? * 1000;
    let claims = Claims {
        subject: args.subject.clone(),
        roles,
        expires_ms: now_ms().saturating_add(ttl_ms),
    };
    print_line(issue(&secret, &claims)?)?;
    Ok(ExitCode::SUCCESS)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// `30d`, `12h`, `15m`, `90s` in seconds: above zero, at most [`TTL_S_MAX`].
fn ttl_s(text: &str) -> Result<u64, String> {
    let bad = || format!("--ttl {text:?}: expected a number with s, m, h or d, like 30d");
    let split = text.len().checked_sub(1).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let unit_s = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let seconds = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_s))
        .ok_or_else(bad)?;
    if seconds == 0 || seconds > TTL_S_MAX {
        return Err(format!("--ttl {text:?}: above zero and at most ten years"));
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_have_a_unit_and_bounds() {
        assert_eq!(ttl_s("30d"), Ok(30 * 86_400));
        assert_eq!(ttl_s("2h"), Ok(7200));
        assert_eq!(ttl_s("90s"), Ok(90));
        for bad in [
            "",
            "d",
            "30",
            "0d",
            "-1d",
            "30w",
            "3661d",
            "99999999999999999999d",
        ] {
            assert!(ttl_s(bad).is_err(), "{bad:?}");
        }
    }
}
