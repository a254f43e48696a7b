//! TLS to Redis with the operator's own CA (`rediss://` and a PEM file of CA certificates).
//!
//! Without [`TlsRoots`], fred 10.1 (feature `enable-rustls-ring`) trusts the system's CA
//! certificates as rustls-native-certs finds them: the file `SSL_CERT_FILE` and the folders of
//! `SSL_CERT_DIR` when either variable is set, else the platform's store (on Debian,
//! `/etc/ssl/certs`). A Redis whose certificate comes from a private CA needs that CA instead:
//! [`TlsRoots`] is a rustls client configuration (ring provider, TLS 1.2 and 1.3, the same
//! versions fred's default allows) whose root store holds exactly the certificates of one PEM
//! file, handed to fred as its TLS connector.
//!
//! The name checked against the server's certificate is the host of the URL (an IP address
//! must then be in the certificate's subjectAltName as an IP); on a Redis Cluster, the nodes
//! found through `CLUSTER SLOTS` are checked against the address they announce.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fred::types::config::{TlsConfig, TlsConnector, TlsHostMapping};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::Error;

/// The CA certificates a `rediss://` connection trusts, and only those.
#[derive(Clone)]
pub struct TlsRoots {
    /// The PEM file they were read from, for messages.
    path: PathBuf,
    /// How many certificates it held.
    certificates: usize,
    /// fred's TLS settings built on them (a shared rustls configuration: cloning is cheap).
    tls: TlsConfig,
}

impl std::fmt::Debug for TlsRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsRoots")
            .field("path", &self.path)
            .field("certificates", &self.certificates)
            .finish()
    }
}

impl TlsRoots {
    /// Reads every `CERTIFICATE` of the PEM file `path` into a root store of their own. Fails,
    /// naming the file, when it cannot be read, holds a malformed PEM section or a certificate
    /// rustls cannot use as a trust anchor, or holds no certificate at all (a key file given by
    /// mistake would otherwise leave a store that trusts nothing, and every connect would fail
    /// later with a less telling reason).
    pub fn from_pem_file(path: &Path) -> Result<TlsRoots, Error> {
        let bad = |why: String| Error::Ca { path: path.to_owned(), why };
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for cert in certs {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            roots.add(cert).map_err(|e| bad(format!("not a CA certificate rustls can use: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("no CERTIFICATE in the file (a PEM file of CA certificates is expected)".into()));
        }
        let certificates = roots.len();
        // The ring provider named here rather than taken from the process default: no other
        // provider is built in, and nothing else need install one first.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS with the ring provider: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = TlsConfig { connector: TlsConnector::from(config), hostnames: TlsHostMapping::None };
        Ok(TlsRoots { path: path.to_owned(), certificates, tls })
    }

    /// The file the certificates came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many CA certificates are trusted.
    pub fn certificates(&self) -> usize {
        self.certificates
    }

    /// fred's TLS settings trusting these roots.
    pub(crate) fn fred_tls(&self) -> TlsConfig {
        self.tls.clone()
    }
}
