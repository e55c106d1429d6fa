//! A RabbitMQ node with a TLS listener (`deploy/rabbitmq-tls.sh`) and the certificates
//! it and its clients use, generated per run: a CA, a server certificate for
//! `localhost` and 127.0.0.1, a client certificate, and a second CA that signed none
//! of them.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rabbitmq-tls.sh");

/// The CN of the client certificate, which SASL EXTERNAL makes the broker user.
pub const CLIENT_CN: &str = "keelson-tls-client";

/// The PEM files of one run, in a directory of the test's.
#[derive(Debug, Clone)]
pub struct Certs {
    pub dir: PathBuf,
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA that signed nothing the broker shows.
    pub other_ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a key")).expect("a CA")
}

fn leaf(
    cn: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).expect("certificate parameters");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("a key");
    let cert = params.signed_by(&key, issuer).expect("a certificate");
    (cert.pem(), key.serialize_pem())
}

impl Certs {
    /// Generate every file into `dir`.
    pub fn generate(dir: &Path) -> Self {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("cannot write a certificate");
            path
        };
        let issuer = ca("Keelson test CA");
        let other = ca("Keelson other CA");
        let (server, server_key) = leaf(
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let (client, client_key) =
            leaf(CLIENT_CN, &[], ExtendedKeyUsagePurpose::ClientAuth, &issuer);
        write("server.pem", &server);
        write("server-key.pem", &server_key);
        Self {
            dir: dir.to_owned(),
            ca: write("ca.pem", &issuer.pem()),
            other_ca: write("other-ca.pem", &other.pem()),
            client_cert: write("client.pem", &client),
            client_key: write("client-key.pem", &client_key),
        }
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot find a free loopback port")
        .port()
}

fn script_with(args: &[&str], env: &[(&str, String)]) -> String {
    super::run_script(SCRIPT, args, env)
}

fn script(args: &[&str]) -> String {
    script_with(args, &[])
}

/// The TLS node, started with `certs` on free loopback ports (a node left by an
/// earlier run is stopped first); stopped and deleted on drop.
pub struct TlsNode {
    pub name: String,
    pub port: u16,
}

impl TlsNode {
    pub fn start(certs: &Certs) -> Self {
        let started = std::time::Instant::now();
        let dir = certs.dir.display().to_string();
        // Free ports of this moment, rather than fixed ones another broker may hold.
        let port = free_port();
        let env = [
            ("KEELSON_TLS_PORT", port.to_string()),
            ("KEELSON_TLS_DIST_PORT", free_port().to_string()),
        ];
        let said = script_with(&["start", &dir], &env);
        println!(
            "TLS node ready in {:.1?}: {}",
            started.elapsed(),
            said.trim()
        );
        Self {
            name: script(&["node"]).trim().to_owned(),
            port,
        }
    }

    /// `rabbitmqctl -q -n {node} args`; fails the test when it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run rabbitmqctl: {e}"));
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A broker user with every permission on the default vhost.
    pub fn add_user(&self, user: &str, password: &str) {
        self.ctl(&["add_user", user, password]);
        self.ctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(SCRIPT).arg("stop").output();
    }
}
