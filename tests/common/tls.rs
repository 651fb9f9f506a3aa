//! A throwaway certificate authority for HTTPS tests: [`TestCa`] makes, with
//! the `openssl` command (installed by `scripts/setup-test-deps.sh`), a
//! self-signed P-256 CA and a server certificate it signs for the IP
//! address 127.0.0.1 (CN and SAN), valid for two days, all in a temp dir;
//! [`agent_trusting`] is a ureq agent that trusts only that CA (the test's
//! own client: pushes and readiness probes).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A CA and a server certificate for 127.0.0.1, as PEM files.
pub struct TestCa {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (scripts/setup-test-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=blobmgr test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(d, &ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(d, &csr);
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName = IP:127.0.0.1\n\
             basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth\n",
        )
        .expect("write server.ext");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                "1",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.pem",
            ],
        );
        TestCa { dir }
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate for 127.0.0.1 (PEM), signed by [`TestCa::ca`].
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server certificate's private key (PEM).
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

/// A ureq agent like [`super::agent`] that trusts only the CA in `ca`.
pub fn agent_trusting(ca: &Path) -> ureq::Agent {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let certs: Vec<ureq::tls::Certificate<'static>> = CertificateDer::pem_file_iter(ca)
        .expect("open CA file")
        .map(|c| ureq::tls::Certificate::from_der(c.expect("CA PEM").as_ref()).to_owned())
        .collect();
    assert!(!certs.is_empty(), "no certificate in {}", ca.display());
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .build();
    super::registry::agent_with(Some(tls))
}
