//! TLS to the broker (`amqps://` URLs, cargo feature `tls`): the rustls connector
//! built from the `tls_*` settings, the connection through it, and the handshake
//! failures an operator meets, in words that name the setting to fix.
//!
//! lapin can take a CA bundle (`OwnedTLSConfig::cert_chain`), but it adds it to its
//! compiled-in roots; `tls_ca_file` must *replace* them (a broker certificate for the
//! right name from any public CA would pass otherwise). So the connector is built
//! here and handed to lapin through `Connection::connector`, which also lets us read
//! rustls's own error before lapin flattens it.

use super::config::AmqpConfig;
use lapin::tcp::{AMQPUriTcpExt, TLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use rustls_connector::rustls::{self, AlertDescription, CertificateError};
use rustls_connector::rustls_pki_types::pem::PemObject;
use rustls_connector::rustls_pki_types::{CertificateDer, PrivateKeyDer};
use rustls_connector::{RustlsConnector, RustlsConnectorConfig};
use std::fmt;
use std::io;
use std::path::Path;

/// The TLS side of the `amqps://` URLs: one connector for all of them.
#[derive(Clone)]
pub(crate) struct Tls {
    connector: RustlsConnector,
    /// What the broker's certificate is checked against, for error messages.
    roots: String,
    /// Whether a client certificate is presented.
    client_certificate: bool,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("roots", &self.roots)
            .field("client_certificate", &self.client_certificate)
            .finish()
    }
}

impl Tls {
    /// Read the CA bundle and the client certificate and key the settings name. An
    /// unreadable or unparsable file is an error naming the key and the file.
    pub(crate) fn load(config: &AmqpConfig) -> Result<Self, String> {
        let (builder, roots) = match &config.tls_ca_file {
            Some(path) => {
                let certs = read_certificates("tls_ca_file", path)?;
                let mut builder = RustlsConnectorConfig::default();
                let count = certs.len();
                for cert in &certs {
                    rustls_connector::webpki::anchor_from_trusted_cert(cert).map_err(|e| {
                        format!(
                            "`tls_ca_file` ({}) holds a certificate that cannot be a CA: {e}",
                            path.display()
                        )
                    })?;
                }
                builder.add_parsable_certificates(certs);
                (
                    builder,
                    format!(
                        "the {count} CA certificate(s) of transport.tls_ca_file ({})",
                        path.display()
                    ),
                )
            }
            None => (
                RustlsConnectorConfig::new_with_webpki_root_certs(),
                "the bundled webpki roots (public CAs; transport.tls_ca_file is not set)"
                    .to_owned(),
            ),
        };
        let connector = match (&config.tls_cert_file, &config.tls_key_file) {
            (None, None) => builder
                .connector_with_no_client_auth()
                .map_err(|e| format!("cannot set up TLS: {e}")),
            (Some(cert), Some(key)) => {
                let chain = read_certificates("tls_cert_file", cert)?;
                let key_der = read_key(key)?;
                builder
                    .connector_with_single_cert(chain, key_der)
                    .map_err(|e| {
                        format!(
                            "`tls_cert_file` ({}) and `tls_key_file` ({}) do not make a client \
                         certificate: {e}",
                            cert.display(),
                            key.display()
                        )
                    })
            }
            _ => {
                return Err(
                    "`tls_cert_file` and `tls_key_file` go together: set both or neither".into(),
                );
            }
        }?;
        Ok(Self {
            connector,
            roots,
            client_certificate: config.tls_cert_file.is_some(),
        })
    }

    /// Whether a client certificate is presented (then SASL EXTERNAL is used).
    pub(crate) fn client_certificate(&self) -> bool {
        self.client_certificate
    }

    /// Connect to `uri` (an `amqps://` URL) through this connector. A refused
    /// handshake is described in terms of the settings ([`explain`]).
    pub(crate) async fn connect(
        &self,
        uri: AMQPUri,
        properties: ConnectionProperties,
    ) -> Result<Connection, String> {
        let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
        let connector = self.connector.clone();
        let host = uri.authority.host.clone();
        let connected = Connection::connector(
            uri,
            runtime,
            async move |uri: AMQPUri, runtime| {
                let mut plain = uri.clone();
                plain.scheme = AMQPScheme::AMQP;
                let stream = plain
                    .connect_with_config_async(TLSConfig::default(), &runtime)
                    .await?;
                Ok(stream.into_rustls(&connector, &uri.authority.host).await?)
            },
            properties,
        )
        .await;
        connected.map_err(|e| match explain(&e, &host, &self.roots) {
            Some(why) => why,
            None => e.to_string(),
        })
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("`{key}` ({}) cannot be read: {e}", path.display()))
}

fn read_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{key}` ({}) is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "`{key}` ({}) holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read("tls_key_file", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "`tls_key_file` ({}) holds no unencrypted PEM private key (PKCS#8, PKCS#1 or \
             SEC1): {e}",
            path.display()
        )
    })
}

/// The rustls error under a lapin error, if a TLS failure caused it.
fn rustls_error(error: &lapin::Error) -> Option<&rustls::Error> {
    let lapin::ErrorKind::IOError(io) = error.kind() else {
        return None;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = io
        .get_ref()
        .map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        source = match e.downcast_ref::<io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// A refused TLS handshake with `host`, in terms of the settings to check; `None`
/// when `error` is no TLS failure.
pub(crate) fn explain(error: &lapin::Error, host: &str, roots: &str) -> Option<String> {
    let tls = rustls_error(error)?;
    Some(match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "broker certificate not trusted: it is not signed by {roots}; check \
                 transport.tls_ca_file ({tls})"
            ),
            CertificateError::NotValidForName => format!(
                "broker certificate name mismatch: the certificate is not for {host}, \
                 the host the URL names; connect by a name the certificate holds ({tls})"
            ),
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "broker certificate name mismatch: the certificate is for {}, the URL \
                 names {host}; connect by a name the certificate holds, or give the broker \
                 a certificate for {host}",
                if presented.is_empty() {
                    "no name at all".to_owned()
                } else {
                    presented
                        .iter()
                        .map(|name| plain_name(name))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => format!(
                "broker certificate outside its validity period (or this machine's clock \
                 is wrong): {tls}"
            ),
            _ => format!("broker certificate refused: {tls}"),
        },
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::HandshakeFailure),
        ) => format!(
            "the broker refused the TLS handshake ({alert:?}): it may require a client \
             certificate it trusts; check transport.tls_cert_file and transport.tls_key_file"
        ),
        rustls::Error::InvalidMessage(_) => format!(
            "the broker at {host} did not answer in TLS: is the URL's port its TLS \
             listener? ({tls})"
        ),
        _ => format!("TLS with the broker at {host} failed: {tls}"),
    })
}

/// `DnsName("localhost")` or `IpAddress(127.0.0.1)`, as rustls words a certificate's
/// names, as `localhost` and `127.0.0.1`.
fn plain_name(name: &str) -> &str {
    ["DnsName(\"", "IpAddress("]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .map_or(name, |rest| {
            rest.trim_end_matches(')').trim_end_matches('"')
        })
}

#[cfg(test)]
mod tests {
    use super::plain_name;

    #[test]
    fn certificate_names_are_shown_plainly() {
        assert_eq!(plain_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(plain_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(plain_name("*.example"), "*.example");
    }
}
