//! HTTP/1.1 target: `POST` the payload, expect `200` and the same bytes back.
//!
//! Each worker owns one keep-alive connection driven by hyper's low-level client
//! (no pool to lock), like wrk does; a connection the server closed is reopened.

use super::Target;
use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// `POST url` with a fixed JSON body.
#[derive(Debug)]
pub struct HttpEcho {
    addr: SocketAddr,
    authority: String,
    path: String,
    body: Bytes,
    timeout: Duration,
}

impl HttpEcho {
    /// A target posting `body` to `url` (`http://host:port/path`).
    pub async fn new(url: &str, body: Bytes, timeout: Duration) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("http"),
            "only http:// URLs are supported: {url}"
        );
        let authority = uri
            .authority()
            .with_context(|| format!("no host in {url}"))?
            .to_string();
        let addr = tokio::net::lookup_host(&authority)
            .await
            .with_context(|| format!("cannot resolve {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), ToString::to_string);
        Ok(Self {
            addr,
            authority,
            path,
            body,
            timeout,
        })
    }

    async fn exchange(&self, conn: &mut SendRequest<Full<Bytes>>) -> Result<(), String> {
        if conn.is_closed() {
            *conn = self.connect().await.map_err(|e| format!("{e:#}"))?;
        }
        conn.ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let request = Request::post(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(self.body.clone()))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = conn
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        if body != self.body {
            return Err(format!(
                "the answer is not the echoed body ({} bytes instead of {})",
                body.len(),
                self.body.len()
            ));
        }
        Ok(())
    }
}

impl Target for HttpEcho {
    type Conn = SendRequest<Full<Bytes>>;

    async fn connect(&self) -> anyhow::Result<Self::Conn> {
        let stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("cannot connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the connection closes; the next call then reconnects.
            let _ = connection.await;
        });
        Ok(sender)
    }

    async fn call(&self, conn: &mut Self::Conn) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.exchange(conn)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // The connection may hold a half-read answer: never reuse it.
                *conn = self.connect().await.map_err(|e| format!("{e:#}"))?;
                Err(format!("no answer within {:?}", self.timeout))
            }
        }
    }
}
