//! Test certificates: a throwaway CA and a server certificate for 127.0.0.1 and localhost,
//! for redis-server's TLS listener in the cluster tests and for loadgen's TLS peers (mosquitto
//! with TLS) in its tests and the bench.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

/// PEM files written by [`write_test_certs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestCerts {
    /// The CA's certificate (`ca.pem`): what a client trusts, and the server's
    /// `--tls-ca-cert-file`.
    pub ca: PathBuf,
    /// The server's certificate (`server.pem`), signed by the CA, for IP 127.0.0.1 and DNS
    /// localhost.
    pub cert: PathBuf,
    /// The server's private key (`server.key`, PKCS#8, unencrypted).
    pub key: PathBuf,
}

/// Writes a fresh CA (`ca.pem`) and a server certificate (`server.pem`) and key (`server.key`)
/// it signed, valid for IP 127.0.0.1 and DNS localhost (ECDSA P-256), into `dir` (made if
/// missing). For tests only:
/// the CA's key is thrown away, the server's is written unencrypted.
pub fn write_test_certs(dir: &Path) -> Result<TestCerts, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let err = |e: rcgen::Error| format!("cannot make test certificates: {e}");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: a certificate of another test CA is then from an unknown issuer, not
    // one whose signature is bad.
    let tag = RandomState::new().build_hasher().finish();
    ca_params.distinguished_name.push(DnType::CommonName, format!("fleetgate test CA {tag:016x}"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).map_err(err)?;
    params.distinguished_name.push(DnType::CommonName, "localhost");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(err)?;
    let cert = params.signed_by(&key, &issuer).map_err(err)?;

    std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let certs =
        TestCerts { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key") };
    for (path, text) in
        [(&certs.ca, ca_cert.pem()), (&certs.cert, cert.pem()), (&certs.key, key.serialize_pem())]
    {
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(certs)
}
