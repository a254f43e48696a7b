//! TLS for the MQTT target (`--tls-ca`): the same MQTT bytes inside TLS 1.3, so the gate's own
//! secure channel can be set beside "mosquitto with TLS" on the same traffic.
//!
//! - [`client_config`]: rustls with the ring provider, TLS 1.3 only, trusting only the CA in the
//!   `--tls-ca` PEM file. The server name checked is `--gate`'s IP address ([`server_name`]),
//!   so the broker's certificate must carry that IP in its subjectAltName.
//! - [`Tls`]: one connection's TLS without I/O, as the event loop needs it: ciphertext read
//!   from the socket goes in ([`Tls::read`]: `read_tls` and `process_new_packets`, plaintext
//!   drained with `reader()`), plaintext the MQTT code wrote goes out ([`Tls::write`]: `writer()`
//!   and `write_tls` into the bytes to send). The MQTT code may write before the handshake is
//!   done: rustls holds those bytes and sends them once it is (CONNECT goes out then), so the
//!   handshake is part of connecting, and a driver is up at its SUBACK as without TLS.
//! - [`handshake`]: one blocking handshake, to fail a run at its start with rustls's reason
//!   (an unknown CA, a name mismatch) instead of a fleet of connections failing over and over.
//! - [`write_test_certs`]: a CA and a server certificate for 127.0.0.1 and localhost, as PEM
//!   files, for the tests and perf's bench to start mosquitto with TLS.
//!
//! Memory: a connection keeps its `ClientConnection` (boxed, about 1 KiB beside the buffers
//! rustls allocates as it needs them: about 4 KiB of read buffer once anything was read);
//! loadgen keeps no buffer of its own per connection. Plaintext in and out goes through
//! buffers of the loop.

use rustls::client::ClientConnection;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A TLS 1.3 client configuration (ring provider) trusting only the CA certificate(s) in the
/// PEM file `ca`. Errors name the file and say what is wrong with it.
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let what = || format!("--tls-ca {}", ca.display());
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", what()))?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", what()))?;
        roots.add(cert).map_err(|e| format!("{}: not a CA certificate rustls can use: {e}", what()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file (a PEM file of the CA is expected)", what()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3 with the ring provider: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name the broker's certificate is checked against: the IP address connected to.
pub fn server_name(addr: SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// What every TLS connection of a run needs: the configuration and the name to check.
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// rustls's configuration (shared, with its session cache).
    pub config: Arc<ClientConfig>,
    /// The server's name: `--gate`'s IP address.
    pub name: ServerName<'static>,
}

impl TlsClient {
    /// The configuration from the CA file `ca`, for the server at `addr`.
    pub fn new(ca: &Path, addr: SocketAddr) -> Result<TlsClient, String> {
        Ok(TlsClient { config: client_config(ca)?, name: server_name(addr) })
    }

    /// A new connection's TLS; its ClientHello is appended to `out`.
    pub fn start(&self, out: &mut Vec<u8>) -> Result<Tls, rustls::Error> {
        let conn = ClientConnection::new(self.config.clone(), self.name.clone())?;
        let mut tls = Tls { conn: Box::new(conn) };
        tls.flush(out);
        Ok(tls)
    }
}

/// One connection's TLS, without I/O: ciphertext in and out through the caller's buffers.
#[derive(Debug)]
pub struct Tls {
    /// Boxed: a driver that is not connected keeps only a pointer's room for it.
    conn: Box<ClientConnection>,
}

impl Tls {
    /// The handshake is still under way.
    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Takes `data`, ciphertext just read from the socket: appends the plaintext it carried to
    /// `plain`, and what TLS itself must send (the rest of the handshake, an alert) to `out`.
    /// `Err`: the connection cannot go on (an alert for the server, if any, is in `out`).
    pub fn read(
        &mut self,
        mut data: &[u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), rustls::Error> {
        let r = self.read_all(&mut data, plain);
        self.flush(out);
        r
    }

    fn read_all(&mut self, data: &mut &[u8], plain: &mut Vec<u8>) -> Result<(), rustls::Error> {
        while !data.is_empty() {
            // rustls takes what fits its record buffer (at most a record or 4 KiB at a time);
            // processing empties it for the next part. Reading a slice cannot fail; rustls
            // refuses only if its buffers are full, which draining below prevents.
            match self.conn.read_tls(data) {
                // The server said close_notify: what follows it is not read.
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(rustls::Error::General(format!("reading TLS records: {e}"))),
            }
            let state = self.conn.process_new_packets()?;
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let at = plain.len();
                plain.resize(at + n, 0);
                self.conn
                    .reader()
                    .read_exact(&mut plain[at..])
                    .map_err(|e| rustls::Error::General(format!("reading plaintext: {e}")))?;
            }
        }
        Ok(())
    }

    /// Encrypts `plain` (before the handshake is done: holds it until it is) and appends the
    /// records to `out`.
    pub fn write(&mut self, mut plain: &[u8], out: &mut Vec<u8>) {
        while !plain.is_empty() {
            // rustls takes at most 64 KiB per call (its bound on queued records), and its
            // queue is emptied into `out` after each.
            let n = self.conn.writer().write(plain).unwrap_or(0);
            self.flush(out);
            if n == 0 {
                // Only before the handshake, past 64 KiB held: never for what MQTT writes
                // then (CONNECT and SUBSCRIBE).
                debug_assert!(false, "rustls took none of {} plaintext bytes", plain.len());
                return;
            }
            plain = &plain[n..];
        }
    }

    /// Appends close_notify to `out`.
    pub fn close(&mut self, out: &mut Vec<u8>) {
        self.conn.send_close_notify();
        self.flush(out);
    }

    /// Moves every record rustls has queued into `out` (writing to a `Vec` cannot fail).
    fn flush(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            if self.conn.write_tls(out).is_err() {
                return;
            }
        }
    }
}

/// One TLS handshake with the server at `addr` on a blocking socket, then close_notify: `Err`
/// says why it failed (rustls's reason: an unknown issuer, a name the certificate does not
/// carry, a server that closed).
pub fn handshake(client: &TlsClient, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut tls = client.start(&mut out).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut plain = Vec::new();
    while tls.handshaking() {
        stream.write_all(&out).map_err(|e| e.to_string())?;
        out.clear();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no handshake within {timeout:?}"));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the server closed the connection during the handshake".into());
        }
        let r = tls.read(&buf[..n], &mut plain, &mut out);
        if let Err(e) = r {
            // Tell the server why (the alert is in `out`), then report.
            let _ = stream.write_all(&out);
            return Err(e.to_string());
        }
    }
    tls.close(&mut out);
    let _ = stream.write_all(&out);
    Ok(())
}

/// The test certificates live with the other test fixtures (redis-server's TLS uses them too).
pub use testkit::certs::{write_test_certs, TestCerts};

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::{ServerConfig, ServerConnection};
    use rustls_pki_types::PrivateKeyDer;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("loadgen-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn server(certs: &TestCerts) -> ServerConnection {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&certs.cert).expect("cert").map(|c| c.expect("pem")).collect();
        let key = PrivateKeyDer::from_pem_file(&certs.key).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        ServerConnection::new(Arc::new(config)).expect("server")
    }

    /// Moves everything the server has to send through `client.read`, in pieces of `chunk`
    /// bytes; returns the plaintext.
    fn to_client(
        s: &mut ServerConnection,
        c: &mut Tls,
        out: &mut Vec<u8>,
        chunk: usize,
    ) -> Result<Vec<u8>, rustls::Error> {
        let mut wire = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut wire).expect("vec");
        }
        let mut plain = Vec::new();
        for piece in wire.chunks(chunk) {
            c.read(piece, &mut plain, out)?;
        }
        Ok(plain)
    }

    fn to_server(s: &mut ServerConnection, out: &mut Vec<u8>) -> Result<Vec<u8>, rustls::Error> {
        let mut data = &out[..];
        let mut plain = Vec::new();
        while !data.is_empty() {
            if s.read_tls(&mut data).expect("slice") == 0 {
                break;
            }
            let n = s.process_new_packets()?.plaintext_bytes_to_read();
            let at = plain.len();
            plain.resize(at + n, 0);
            s.reader().read_exact(&mut plain[at..]).expect("plaintext");
        }
        out.clear();
        Ok(plain)
    }

    #[test]
    fn a_handshake_in_memory_carries_bytes_both_ways_in_any_pieces() {
        let dir = temp_dir("ok");
        let certs = write_test_certs(&dir).expect("certs");
        let addr: SocketAddr = "127.0.0.1:8883".parse().expect("addr");
        let client = TlsClient::new(&certs.ca, addr).expect("config");
        for chunk in [1, 7, 100, 5000] {
            let mut s = server(&certs);
            let mut out = Vec::new();
            let mut c = client.start(&mut out).expect("start");
            // MQTT writes before the handshake is done: held until it is.
            c.write(b"CONNECT", &mut out);
            assert!(c.handshaking());
            let mut got = Vec::new();
            for _ in 0..4 {
                got.extend(to_server(&mut s, &mut out).expect("server reads"));
                let plain = to_client(&mut s, &mut c, &mut out, chunk).expect("client reads");
                assert!(plain.is_empty());
            }
            assert!(!c.handshaking());
            got.extend(to_server(&mut s, &mut out).expect("server reads"));
            assert_eq!(got, b"CONNECT", "chunk {chunk}");
            // A large message from the server, more than one record.
            let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
            s.writer().write_all(&big).expect("write");
            let plain = to_client(&mut s, &mut c, &mut out, chunk).expect("client reads");
            assert_eq!(plain, big, "chunk {chunk}");
            c.write(&big, &mut out);
            assert_eq!(to_server(&mut s, &mut out).expect("server reads"), big);
            c.close(&mut out);
            to_server(&mut s, &mut out).expect("close_notify");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_certificate_from_another_ca_or_for_another_address_is_refused() {
        let dir = temp_dir("bad");
        let certs = write_test_certs(&dir.join("a")).expect("certs");
        let other = write_test_certs(&dir.join("b")).expect("other certs");
        let cases = [
            (other.ca.clone(), "127.0.0.1:8883", "UnknownIssuer"),
            (certs.ca.clone(), "127.0.0.2:8883", "not valid for name \"127.0.0.2\""),
        ];
        for (ca, addr, why) in cases {
            let client = TlsClient::new(&ca, addr.parse().expect("addr")).expect("config");
            let mut s = server(&certs);
            let mut out = Vec::new();
            let mut c = client.start(&mut out).expect("start");
            to_server(&mut s, &mut out).expect("server reads the hello");
            let e = to_client(&mut s, &mut c, &mut out, 4096).expect_err("refused");
            assert!(e.to_string().contains(why), "{e}");
            assert!(!out.is_empty(), "an alert for the server");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ca_file_without_certificates_is_an_error_that_names_it() {
        let dir = temp_dir("empty");
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("empty.pem");
        std::fs::write(&f, "not a certificate\n").expect("write");
        let e = client_config(&f).expect_err("no certificate");
        assert!(e.contains("--tls-ca") && e.contains("empty.pem") && e.contains("no CERTIFICATE"), "{e}");
        let e = client_config(&dir.join("missing.pem")).expect_err("no file");
        assert!(e.contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
