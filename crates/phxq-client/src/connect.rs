//! The one place a channel to a node is built: the library's router, the CLI's router and
//! the benchmark clients all dial through [`endpoint`], plaintext or TLS alike.
//!
//! With a store CA ([`StoreCa`]) every connection is TLS and the node's certificate must be
//! signed by that CA and name the host the store *advertises* for the node (its
//! `client_addr`, which `ClusterStatus` lists and `NOT_MASTER` redirects to), even when the
//! node is dialled elsewhere (`connect_via`): a redirect keeps TLS and is verified like the
//! first node. Clients present no certificate; tokens say who they are.
//!
//! A mismatch (a CA given to a plaintext port, none given to a TLS port, another store's CA)
//! fails every attempt the same way; [`tls_mismatch`] recognises it so callers stop at once
//! with a message saying what to change, instead of retrying until their deadline.

use std::error::Error as _;
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// How long a TLS handshake may take once connected (a node answers within milliseconds;
/// a port that accepts and says nothing must not hold a call until its deadline).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest CA file read, in bytes (a bundle of a few stores' CAs is a few KiB).
pub const CA_FILE_BYTES_MAX: u64 = 1 << 20;

/// The certificate(s) of a store's CA (PEM; several stores: their CAs concatenated), checked
/// to hold at least one well-formed certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreCa {
    pem: Vec<u8>,
    certificates: usize,
}

impl std::fmt::Debug for StoreCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreCa({} certificates)", self.certificates)
    }
}

impl StoreCa {
    /// A CA from PEM text (`ca.pem` of `phxq cert` or `phxq dev`).
    pub fn from_pem(pem: impl Into<Vec<u8>>) -> Result<StoreCa, String> {
        let pem = pem.into();
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("not a PEM certificate file: {error}"))?
            .len();
        if certificates == 0 {
            return Err("no certificate in it (expected the store CA's ca.pem)".to_string());
        }
        Ok(StoreCa { pem, certificates })
    }

    /// A CA from a PEM file; errors name the file.
    pub fn load(path: &Path) -> Result<StoreCa, String> {
        let fail = |reason: String| format!("{}: {reason}", path.display());
        // Read through the bound itself, not after a size check a growing file could pass.
        let mut pem = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(CA_FILE_BYTES_MAX + 1).read_to_end(&mut pem))
            .map_err(|error| fail(error.to_string()))?;
        if pem.len() as u64 > CA_FILE_BYTES_MAX {
            return Err(fail(format!(
                "over {CA_FILE_BYTES_MAX} bytes; a CA file is at most that"
            )));
        }
        StoreCa::from_pem(pem).map_err(fail)
    }
}

/// An endpoint for the node the store advertises as `advertised`, dialled at `dial` (the same
/// address unless the caller maps it, `connect_via`): plaintext without `ca`, else TLS
/// verified against `ca` for `advertised`'s host. Connects lazily; `Err` names a bad address.
pub fn endpoint(
    advertised: &str,
    dial: &str,
    ca: Option<&StoreCa>,
    connect_timeout: Duration,
) -> Result<Endpoint, String> {
    let scheme = if ca.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{dial}"))
        .map_err(|error| format!("bad node address {dial:?}: {error}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    let Some(ca) = ca else {
        return Ok(endpoint);
    };
    let (host, _port) = advertised
        .rsplit_once(':')
        .ok_or_else(|| format!("bad node address {advertised:?}: expected HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name(host)
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    endpoint
        .tls_config(tls)
        .map_err(|error| format!("TLS for {advertised}: {error}"))
}

/// What to change when `status` (a failed call) shows the client and the node disagree on
/// TLS: `tls` says whether the client used a CA. `None` for any other failure.
pub fn tls_mismatch(status: &tonic::Status, tls: bool) -> Option<String> {
    let chain = error_chain(status);
    if tls {
        if chain.contains("invalid peer certificate") {
            let detail = last_line(&chain);
            return Some(format!(
                "TLS: the node's certificate is not accepted ({detail}): give the CA of this \
                 store (its ca.pem), and dial a host its certificate names"
            ));
        }
        // A TLS client reading a plaintext HTTP/2 server's bytes as TLS records.
        if chain.contains("corrupt message") || chain.contains("InvalidContentType") {
            return Some(
                "TLS: the node's client port does not speak TLS: drop the CA (--ca, PHXQ_CA) \
                 for this store, or turn [tls] client_port on"
                    .to_string(),
            );
        }
    } else if chain.contains("frame with invalid size")
        || chain.contains("invalid HTTP/2 frame")
        || chain.contains("FRAME_SIZE_ERROR")
    {
        // A plaintext HTTP/2 client reading a TLS alert as a frame header.
        return Some(
            "the node's client port speaks TLS: give the store's CA (--ca FILE or PHXQ_CA; \
             ca.pem of `phxq cert`, or DIR/tls/ca.pem of `phxq dev --tls`)"
                .to_string(),
        );
    }
    None
}

/// The status's message and every source below it, one per line.
fn error_chain(status: &tonic::Status) -> String {
    let mut chain = status.message().to_string();
    let mut source = status.source();
    while let Some(error) = source {
        chain.push('\n');
        chain.push_str(&error.to_string());
        source = error.source();
    }
    chain
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_must_hold_a_certificate() {
        assert!(
            StoreCa::from_pem("")
                .unwrap_err()
                .contains("no certificate")
        );
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(StoreCa::from_pem(key).is_err());
        let broken = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        assert!(StoreCa::from_pem(broken).is_err());
        let missing = StoreCa::load(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(missing.starts_with("/nonexistent/ca.pem: "), "{missing}");
    }

    #[test]
    fn tls_is_verified_for_the_advertised_host() {
        let plain = endpoint(
            "10.0.0.1:7100",
            "127.0.0.1:9100",
            None,
            Duration::from_secs(1),
        );
        assert_eq!(plain.unwrap().uri().scheme_str(), Some("http"));
        assert!(endpoint("no port", "no port", None, Duration::from_secs(1)).is_err());
    }
}
