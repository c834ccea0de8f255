//! TLS for the peer port and the client port: a store's certificate authority, the node
//! certificates it signs, and the rustls configurations built from them.
//!
//! Every store has its own CA (`ca.pem`, `ca.key`). A node certificate names exactly one node
//! of one store, as the DNS name [`node_name`] (`node-2.store-42.phxq`), and may name extra
//! hosts; it is good for both TLS server and client authentication. Between nodes TLS is
//! mutual: the connecting node checks the listener's certificate against the name of the node
//! it dials, and the listener takes the connecting node's id from its client certificate
//! ([`PeerTls::node_of`]), never from the frames it sends.
//!
//! The client port (`[tls] client_port = true`) serves the same node certificate, without
//! client certificates (clients prove who they are with tokens, `crate::auth`): clients
//! verify it against the store CA by the host they dial, so the certificate must name the
//! node's advertised client address ([`client_port_identity`] checks it at start) and every
//! host clients use (`phxq cert node --host`; [`LOCAL_HOSTS`] always).
//!
//! Certificates carry no useful expiry (rcgen's default runs to the year 4096): rotation is a
//! new CA and new node certificates, rolled out node by node. Private keys are written 0600.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use phxq_types::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;

/// File name of a store CA's certificate in a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of a store CA's private key in a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// The DNS name a node certificate carries for `node` of store `store_id`.
pub fn node_name(store_id: u64, node: NodeId) -> String {
    format!("node-{}.store-{store_id}.phxq", node.0)
}

/// Why certificates could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificates or keys.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Paths of the three PEM files a node needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// The store CA's certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// The CA's parameters: the same for a store every time, so a node certificate made later
/// names the issuer exactly as the CA certificate names itself.
fn ca_params(store_id: u64) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("phxq store {store_id} CA"));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Makes store `store_id`'s CA in `dir` (`ca.pem`, `ca.key`) unless both exist already;
/// returns the certificate's path. A CA is never overwritten: every node certificate
/// depends on it.
pub fn ensure_ca(dir: &Path, store_id: u64) -> Result<PathBuf, TlsError> {
    let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    if cert_path.exists() && key_path.exists() {
        return Ok(cert_path);
    }
    create_dir(dir)?;
    let key = KeyPair::generate()?;
    let cert = ca_params(store_id)?.self_signed(&key)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// Makes `node`'s certificate and key in `dir` (`node-K.pem`, `node-K.key`), signed by the
/// CA there, unless both exist already. `hosts` are extra DNS names or IP addresses for
/// clients that dial the node by them.
pub fn ensure_node_cert(
    dir: &Path,
    store_id: u64,
    node: NodeId,
    hosts: &[String],
) -> Result<CertFiles, TlsError> {
    let files = CertFiles {
        ca: dir.join(CA_CERT_FILE),
        cert: dir.join(format!("node-{}.pem", node.0)),
        key: dir.join(format!("node-{}.key", node.0)),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_key_pem = read_file(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|error| TlsError::Pem {
        path: ca_key_path,
        reason: error.to_string(),
    })?;
    let issuer = Issuer::new(ca_params(store_id)?, ca_key);
    let mut names = vec![node_name(store_id, node)];
    names.extend(hosts.iter().cloned());
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, node_name(store_id, node));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

/// Hosts every node certificate names, so a client on the node's own machine can dial it by
/// either (and every store on 127.0.0.1, `phxq dev` and the tests, by its addresses).
pub const LOCAL_HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];

/// A CA and a certificate for every node of `nodes` in `dir`, reusing what exists: what
/// `phxq dev` and the test harnesses run on.
pub fn ensure_store_certs(
    dir: &Path,
    store_id: u64,
    nodes: &[NodeId],
) -> Result<Vec<CertFiles>, TlsError> {
    ensure_ca(dir, store_id)?;
    let hosts = LOCAL_HOSTS.map(String::from);
    nodes
        .iter()
        .map(|&node| ensure_node_cert(dir, store_id, node, &hosts))
        .collect()
}

/// The `[tls]` section of a node config that uses `files`.
pub fn config_section(files: &CertFiles) -> String {
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        files.ca.display().to_string(),
        files.cert.display().to_string(),
        files.key.display().to_string()
    )
}

/// The rustls configurations of one node of a store: its identity, and the store CA that
/// every peer's identity must come from.
#[derive(Clone)]
pub struct PeerTls {
    store_id: u64,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("store_id", &self.store_id)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Loads `files` and builds the listener's (client certificates required) and the
    /// dialer's configurations.
    pub fn load(files: &CertFiles, store_id: u64) -> Result<PeerTls, TlsError> {
        let roots = Arc::new(load_roots(&files.ca)?);
        let chain = load_certs(&files.cert)?;
        let key = load_key(&files.key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config_error = |error: rustls::Error| TlsError::Config(error.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|error| TlsError::Config(error.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_error)?;
        let client = client_builder(provider)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_error)?;
        Ok(PeerTls {
            store_id,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The listener's configuration (client certificates from the store CA required).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The dialer's configuration (presents this node's certificate).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// The name the listener of `node` must prove.
    pub fn server_name(&self, node: NodeId) -> ServerName<'static> {
        ServerName::try_from(node_name(self.store_id, node)).expect("node names are DNS names")
    }

    /// Which of `candidates` the (already CA-verified) certificate chain `chain` names, if
    /// exactly one: the connection's node.
    pub fn node_of(&self, chain: &[CertificateDer<'_>], candidates: &[NodeId]) -> Option<NodeId> {
        let end_entity = webpki::EndEntityCert::try_from(chain.first()?).ok()?;
        let mut named = candidates.iter().copied().filter(|&node| {
            end_entity
                .verify_is_valid_for_subject_name(&self.server_name(node))
                .is_ok()
        });
        match (named.next(), named.next()) {
            (Some(node), None) => Some(node),
            _ => None,
        }
    }
}

/// The client port's certificate chain and key as PEM (what tonic's server takes), after
/// checking that they load and that the certificate names `advertised`'s IP: clients
/// redirected there (`NOT_MASTER` carries it) check the certificate against that address.
pub fn client_port_identity(
    files: &CertFiles,
    advertised: SocketAddr,
) -> Result<(String, String), TlsError> {
    let chain = load_certs(&files.cert)?;
    load_key(&files.key)?;
    let ip = advertised.ip();
    if !ip.is_unspecified() {
        let end_entity = webpki::EndEntityCert::try_from(&chain[0])
            .map_err(|error| TlsError::Config(format!("{}: {error}", files.cert.display())))?;
        let name = ServerName::IpAddress(ip.into());
        if end_entity.verify_is_valid_for_subject_name(&name).is_err() {
            return Err(TlsError::Config(format!(
                "{} does not name {ip}, the node's client address: clients dialling it would \
                 refuse it; make the certificate with `phxq cert node --host {ip}`",
                files.cert.display()
            )));
        }
    }
    Ok((read_file(&files.cert)?, read_file(&files.key)?))
}

fn client_builder(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Config(error.to_string()))
}

fn pem_error(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError + '_ {
    move |error| TlsError::Pem {
        path: path.to_path_buf(),
        reason: error.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(bytes.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(path))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// A root store of the CA certificates in a PEM file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|error| TlsError::Config(format!("{}: {error}", path.display())))?;
    }
    Ok(roots)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    PrivateKeyDer::from_pem_slice(bytes.as_bytes()).map_err(pem_error(path))
}

fn read_file(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` with `mode`, through a temporary file renamed into place, so a
/// crash never leaves half a key where a whole one is expected.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_error = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(io_error)?;
    file.write_all(bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    std::fs::rename(&temporary, path).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_name_their_node_and_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure_store_certs(dir.path(), 42, &[NodeId(1), NodeId(2)]).unwrap();
        let mode = |path: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(path).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&files[0].key), 0o600);
        assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
        let tls = PeerTls::load(&files[1], 42).unwrap();
        let chain = load_certs(&files[1].cert).unwrap();
        let peers = [NodeId(1), NodeId(2), NodeId(3)];
        assert_eq!(tls.node_of(&chain, &peers), Some(NodeId(2)));
        assert_eq!(tls.node_of(&chain, &[NodeId(1), NodeId(3)]), None);
        let other_store = PeerTls::load(&files[1], 43).unwrap();
        assert_eq!(other_store.node_of(&chain, &peers), None);
        let before = std::fs::read(&files[0].cert).unwrap();
        let again = ensure_store_certs(dir.path(), 42, &[NodeId(1), NodeId(2)]).unwrap();
        assert_eq!(
            (again, std::fs::read(&files[0].cert).unwrap()),
            (files, before)
        );
    }

    #[test]
    fn the_client_port_certificate_must_name_the_advertised_address() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure_store_certs(dir.path(), 7, &[NodeId(1)]).unwrap();
        let local: SocketAddr = "127.0.0.1:7100".parse().unwrap();
        let (cert, key) = client_port_identity(&files[0], local).unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
        let any: SocketAddr = "0.0.0.0:7100".parse().unwrap();
        client_port_identity(&files[0], any).expect("a wildcard names no host to check");
        let elsewhere: SocketAddr = "10.1.2.3:7100".parse().unwrap();
        let error = client_port_identity(&files[0], elsewhere)
            .unwrap_err()
            .to_string();
        assert!(error.contains("--host 10.1.2.3"), "{error}");
        let named = ensure_node_cert(dir.path(), 7, NodeId(2), &["10.1.2.3".into()]).unwrap();
        client_port_identity(&named, elsewhere).expect("named by --host");
    }
}
