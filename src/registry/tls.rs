//! TLS settings of one registry endpoint (hosts.toml `ca` and
//! `skip_verify`), turned into the rustls [`ClientConfig`] its
//! [`ureq::Agent`] uses.
//!
//! - `ca`: PEM files of CA certificates trusted **besides** the built-in
//!   roots (webpki-roots, Mozilla's list, what ureq trusts by default). A
//!   file that cannot be read, holds no certificate, or holds one that does
//!   not parse is an error naming the file.
//! - `skip_verify`: the certificate of the endpoint's own host is not
//!   verified at all (no chain, no name, no expiry), but the handshake
//!   signatures still are, with the crypto provider's algorithms, so the
//!   server must hold the key of the certificate it shows. Any other host the
//!   endpoint's agent reaches (a redirect to object storage, a token realm on
//!   another host) is still verified, against the roots above.
//!
//! The config uses ureq's own crypto provider (*ring*) and protocol
//! versions (TLS 1.2 and 1.3), as its default config does.
//!
//! ureq 3 takes a custom root store only in place of the built-in roots
//! (`RootCerts::Specific`, which also drops certificates it cannot parse
//! without a word), and its `disable_verification` turns off every check for
//! every host, handshake signatures included. So the agent of an endpoint
//! with its own config ends in a `TlsConnector` with this module's
//! [`ClientConfig`] instead of ureq's rustls connector, and makes its TLS
//! connections as that one does.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{self, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use ureq::unversioned::transport::time::{Duration, Instant};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, Transport,
    TransportAdapter,
};
use url::Url;

/// The TLS settings of one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tls {
    /// PEM files of CA certificates to trust besides the built-in roots.
    pub extra_ca: Vec<PathBuf>,
    /// Do not verify the certificate of the endpoint's own host.
    pub skip_verify: bool,
}

impl Tls {
    /// Whether these are ureq's defaults (no config of our own needed).
    pub fn is_default(&self) -> bool {
        self.extra_ca.is_empty() && !self.skip_verify
    }

    /// The client config for an endpoint at `url` (whose host is the one
    /// `skip_verify` applies to). Reads the CA files; an error names the
    /// file and says what is wrong with it.
    pub fn client_config(&self, url: &Url) -> Result<Arc<ClientConfig>, String> {
        let provider = Arc::new(crypto::ring::default_provider());
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for path in &self.extra_ca {
            for cert in load_ca_file(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
        }
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .map_err(|e| format!("TLS configuration: {e}"))?;
        let config = if self.skip_verify {
            let host = server_name(url)?;
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("TLS configuration: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SkipVerify {
                    host,
                    others: verifier,
                    provider,
                }))
                .with_no_client_auth()
        } else {
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(Arc::new(config))
    }
}

/// Wraps a connection to an `https://` URL in TLS with its config: the
/// last connector of an endpoint's agent (after `proxy::connector`).
pub(super) struct TlsConnector {
    config: Arc<ClientConfig>,
}

impl TlsConnector {
    pub(super) fn new(config: Arc<ClientConfig>) -> TlsConnector {
        TlsConnector { config }
    }
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector").finish_non_exhaustive()
    }
}

/// The connection's timeout less the time connecting has taken so far
/// (TCP, a proxy's CONNECT), as ureq's own TLS connector counts it: the
/// handshake gets what is left of the request's deadline, not a fresh one.
fn timeout_left(details: &ConnectionDetails) -> NextTimeout {
    let mut left = details.timeout;
    left.after = after_elapsed(left.after, details.now, (details.current_time)());
    left
}

/// What is left of `after`, counted from `start`, at `now`.
fn after_elapsed(after: Duration, start: Instant, now: Instant) -> Duration {
    match (after, start, now) {
        (Duration::Exact(limit), Instant::Exact(start), Instant::Exact(now)) => {
            Duration::Exact(limit.saturating_sub(now.saturating_duration_since(start)))
        }
        _ => after,
    }
}

impl<In: Transport> Connector<In> for TlsConnector {
    type Out = Either<In, TlsTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else {
            return Ok(None);
        };
        // As ureq's own connector: http:// URLs, and a transport already
        // speaking TLS to the server, are passed on as they are.
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let host = details.uri.host().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare)
            .map_err(|_| ureq::Error::Tls("not a TLS server name"))?
            .to_owned();
        let mut conn = ClientConnection::new(self.config.clone(), name)?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(timeout_left(details));
        conn.complete_io(&mut sock)?;
        let buffers = LazyBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(Either::B(TlsTransport {
            buffers,
            stream: StreamOwned { conn, sock },
        })))
    }
}

/// A TLS connection made by [`TlsConnector`].
pub(super) struct TlsTransport {
    buffers: LazyBuffers,
    stream: StreamOwned<ClientConnection, TransportAdapter>,
}

impl fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTransport").finish_non_exhaustive()
    }
}

impl Transport for TlsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output)?;
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self.stream.read(input)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

/// The certificates of a PEM file (other sections, such as keys, are
/// skipped); at least one.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |what: String| format!("CA file {}: {what}", path.display());
    let pem_error = |e: pem::Error| match e {
        pem::Error::Io(e) => bad(e.to_string()),
        pem::Error::MissingSectionEnd { .. } => bad("a PEM section has no END line".into()),
        pem::Error::IllegalSectionStart { .. } => bad("malformed PEM BEGIN line".into()),
        pem::Error::Base64Decode(_) => bad("bad base64 in a PEM section".into()),
        e => bad(format!("not a PEM file: {e}")),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate (BEGIN CERTIFICATE) in it".into()));
    }
    Ok(certs)
}

/// The TLS server name of `url`'s host, as ureq gives it to rustls.
fn server_name(url: &Url) -> Result<ServerName<'static>, String> {
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare)
        .map(|n| n.to_owned())
        .map_err(|e| format!("{host}: not a TLS server name: {e}"))
}

/// `skip_verify` for one host: its certificate is taken as it is; every
/// other host's goes to `others`. Handshake signatures are always checked.
struct SkipVerify {
    host: ServerName<'static>,
    others: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for SkipVerify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SkipVerify")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if *server_name == self.host {
            return Ok(ServerCertVerified::assertion());
        }
        self.others
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed P-256 CA certificate (`openssl req -x509 -newkey ec`).
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBozCCAUmgAwIBAgIUI70iMFHhB3ulj/lSl+83gdpVUTgwCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUYmxvYm1nciB1bml0LXRlc3QgQ0EwHhcNMjYxMTI4MTk0NTI0
WhcNMzYxMTI1MTk0NTI0WjAfMR0wGwYDVQQDDBRibG9ibWdyIHVuaXQtdGVzdCBD
QTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABO/amnu3jTfxFXTX6zsQ1Mw5ptox
ioJ3yV3Da5ikLF8n7jCuvxO3QX/lBAEk0jKSVrFEkcbrJk7U/4w0dL3WMKGjYzBh
MB0GA1UdDgQWBBT15j8VaCFu7eDT4rN5nvm9DUalVTAfBgNVHSMEGDAWgBT15j8V
aCFu7eDT4rN5nvm9DUalVTAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIB
BjAKBggqhkjOPQQDAgNIADBFAiEAvyaxjaTw5Oz9hEmnfup6hKz/Zem8HW4zNm2E
aWd/TpcCIEg+q67XOkLiKj26VlJaOs+KK7voktIr2gT/Qym44Rml
-----END CERTIFICATE-----
";

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn the_handshake_gets_what_is_left_of_the_connection_timeout() {
        use std::time::Duration as Std;
        let start = std::time::Instant::now();
        let later = start + Std::from_secs(20);
        let left = after_elapsed(
            Duration::Exact(Std::from_secs(30)),
            Instant::Exact(start),
            Instant::Exact(later),
        );
        assert_eq!(left, Duration::Exact(Std::from_secs(10)));
        let over = after_elapsed(
            Duration::Exact(Std::from_secs(5)),
            Instant::Exact(start),
            Instant::Exact(later),
        );
        assert_eq!(
            over,
            Duration::Exact(Std::ZERO),
            "past it: no time, not a fresh one"
        );
        let none = after_elapsed(
            Duration::NotHappening,
            Instant::Exact(start),
            Instant::Exact(later),
        );
        assert_eq!(none, Duration::NotHappening);
    }

    #[test]
    fn ca_files_load_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = write("ca.pem", &format!("# a comment\n{CA_PEM}"));
        let two = write("two.pem", &format!("{CA_PEM}{CA_PEM}"));
        assert_eq!(load_ca_file(&good).unwrap().len(), 1);
        assert_eq!(load_ca_file(&two).unwrap().len(), 2);
        let tls = Tls {
            extra_ca: vec![good.clone(), two],
            skip_verify: false,
        };
        tls.client_config(&url("https://reg.example/v2")).unwrap();

        let junk_der = "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n";
        let cases = [
            (dir.path().join("missing.pem"), "No such file"),
            (write("empty.pem", ""), "no PEM certificate"),
            (write("text.pem", "just text\n"), "no PEM certificate"),
            (
                write("cut.pem", &CA_PEM[..200]),
                "a PEM section has no END line",
            ),
            (
                write(
                    "b64.pem",
                    "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
                ),
                "bad base64",
            ),
            (write("junk.pem", junk_der), ""),
        ];
        for (path, why) in cases {
            let tls = Tls {
                extra_ca: vec![good.clone(), path.clone()],
                skip_verify: false,
            };
            let e = tls
                .client_config(&url("https://reg.example/v2"))
                .err()
                .unwrap_or_else(|| panic!("{} accepted", path.display()));
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn skip_verify_trusts_only_the_endpoints_own_host() {
        let provider = Arc::new(crypto::ring::default_provider());
        let roots = Arc::new(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
        for (endpoint, same) in [
            ("https://Mirror.Example:8443/v2", "mirror.example"),
            ("https://127.0.0.1:5000/v2", "127.0.0.1"),
            ("https://[::1]:5000/v2", "::1"),
        ] {
            let v = SkipVerify {
                host: server_name(&url(endpoint)).unwrap(),
                others: WebPkiServerVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                )
                .build()
                .unwrap(),
                provider: provider.clone(),
            };
            // Not even a certificate: accepted for the endpoint's host only.
            let junk = CertificateDer::from(vec![1u8, 2, 3]);
            let name = |s: &str| ServerName::try_from(s.to_string()).unwrap();
            let now = UnixTime::now();
            assert!(
                v.verify_server_cert(&junk, &[], &name(same), &[], now)
                    .is_ok(),
                "{endpoint}"
            );
            assert!(
                v.verify_server_cert(&junk, &[], &name("cdn.example"), &[], now)
                    .is_err(),
                "{endpoint}: another host was not verified"
            );
            assert!(!v.supported_verify_schemes().is_empty());
        }
        let tls = Tls {
            extra_ca: Vec::new(),
            skip_verify: true,
        };
        assert!(!tls.is_default() && Tls::default().is_default());
        tls.client_config(&url("https://reg.example/v2")).unwrap();
    }
}
