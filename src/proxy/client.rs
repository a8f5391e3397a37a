//! The pooled HTTP client that talks to upstreams: HTTP/1.1 or HTTP/2 (by
//! ALPN) over rustls, plain HTTP/1.1 for `http://` upstreams, each of
//! those with connections of its own ([`Pool`], spoken on by the wire
//! crate itself).

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::request::Parts;
use http::uri::Scheme;
use http::{Request, Response};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use abgate_http1::client::{reap_idle, AnswerFields, Pool, SendError, WireError};

use super::headers;
use crate::config::{read_pem_certs, Snapshot};
use crate::proxy::body::Body;

type GeneralClient = Client<HttpsConnector<HttpConnector>, Body>;

/// The upstream client; cloning shares the connections.
#[derive(Clone)]
pub(crate) struct HttpClient {
    /// TLS upstreams, and any other URL (a Prometheus server).
    general: GeneralClient,
    /// The config's plain-HTTP upstreams.
    plain: Arc<[Arc<Pool>]>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

/// Why a request got no answer, from whichever connections it used.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// From hyper-util's client (TLS upstreams, other URLs).
    General(hyper_util::client::legacy::Error),
    /// A plain-HTTP upstream: no connection (refused, unreachable, a name
    /// that does not resolve, or past the connect timeout: `TimedOut`).
    Connect(std::io::Error),
    /// A plain-HTTP upstream's connection failed before the answer's headers.
    Wire(WireError),
    /// No answer's headers by the deadline the request was sent with.
    TimedOut,
}

impl ClientError {
    /// No connection could be made (refused, unreachable, timed out).
    pub(crate) fn is_connect(&self) -> bool {
        match self {
            ClientError::General(err) => err.is_connect(),
            ClientError::Connect(_) => true,
            ClientError::Wire(_) | ClientError::TimedOut => false,
        }
    }

    /// The client's own request body failed while it was being sent on
    /// (broken chunks, a length it did not keep): the client's fault, not
    /// the upstream's.
    pub(crate) fn is_request_body(&self) -> bool {
        matches!(self, ClientError::Wire(WireError::RequestBody(_)))
    }
}

impl From<SendError> for ClientError {
    fn from(error: SendError) -> Self {
        match error {
            SendError::Connect(err) => ClientError::Connect(err),
            SendError::Wire(err) => ClientError::Wire(err),
            SendError::TimedOut => ClientError::TimedOut,
        }
    }
}

/// What the proxy makes of a plain-HTTP upstream's answer fields: it reads
/// the content's type and encoding (to observe and decompress the body),
/// and an upstream's `x-abgate-*` fields are dropped, so that none can
/// pass off its values as the gateway's. The rest go on as they came.
const ANSWER_FIELDS: AnswerFields = AnswerFields {
    mapped: &["content-type", "content-encoding"],
    own: headers::in_gateway_namespace,
};

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::General(err) => write!(f, "{err}"),
            ClientError::Connect(err) => write!(f, "client error: tcp connect error: {err}"),
            ClientError::Wire(err) => write!(f, "client error: {err}"),
            ClientError::TimedOut => f.write_str("client error: no answer by the deadline"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::General(err) => err.source(),
            ClientError::Connect(err) => Some(err),
            ClientError::Wire(err) => Some(err),
            ClientError::TimedOut => None,
        }
    }
}

impl HttpClient {
    /// Sends `request` (absolute URI) and waits for the answer's headers.
    pub(crate) async fn request(
        &self,
        request: Request<Body>,
    ) -> Result<Response<Body>, ClientError> {
        let (mut parts, body) = request.into_parts();
        self.request_until(&mut parts, body, None).await
    }

    /// [`HttpClient::request`] of the request `parts` and `body` make,
    /// giving up at `deadline` if one is given ([`ClientError::TimedOut`]).
    /// The head is lent, not given: the sending may take what it needs of
    /// it (its header map, to reuse), and what it leaves is the caller's.
    pub(crate) async fn request_until(
        &self,
        parts: &mut Parts,
        body: Body,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Response<Body>, ClientError> {
        let uri = &parts.uri;
        if uri.scheme() == Some(&Scheme::HTTP) {
            let pool = self
                .plain
                .iter()
                .find(|pool| uri.authority() == Some(pool.authority()));
            if let Some(pool) = pool {
                // Its connections keep their own timers.
                let response = pool.send(parts, body, deadline).await?;
                return Ok(response.map(Body::Upstream));
            }
        }
        let (empty, ()) = Request::new(()).into_parts();
        let mut request = Request::from_parts(std::mem::replace(parts, empty), body);
        // hyper writes what the map says: the client's Host names the
        // gateway, and the body is framed from itself (its exact size, or
        // chunks), never from the client's framing fields, as on the
        // plain-HTTP side.
        let headers = request.headers_mut();
        headers.remove(HOST);
        headers.remove(CONTENT_LENGTH);
        headers.remove(TRANSFER_ENCODING);
        let sent = self.general.request(request);
        let response = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, sent)
                .await
                .map_err(|_| ClientError::TimedOut)?,
            None => sent.await,
        };
        Ok(response.map_err(ClientError::General)?.map(Body::Stream))
    }
}

/// Builds the client for a config: public web roots plus every `ca_file`,
/// and connections of their own for plain-HTTP upstreams.
pub(crate) fn build(snapshot: &Snapshot) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for upstream in [&snapshot.control, &snapshot.treatment] {
        if let Some(file) = &upstream.ca_file {
            for cert in read_pem_certs(file)? {
                roots
                    .add(cert)
                    .map_err(|err| format!("{}: {err}", file.display()))?;
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| format!("TLS setup failed: {err}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(snapshot.connect_timeout));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let general = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https);
    let mut plain: Vec<Arc<Pool>> = Vec::new();
    for upstream in [&snapshot.control, &snapshot.treatment] {
        let known = plain
            .iter()
            .any(|pool| *pool.authority() == upstream.authority);
        if upstream.scheme == Scheme::HTTP && !known {
            let pool = Pool::new(
                upstream.authority.clone(),
                snapshot.connect_timeout,
                ANSWER_FIELDS,
            );
            if let Some(pool) = pool {
                plain.push(Arc::new(pool));
            }
        }
    }
    // Outside a runtime (a config checked offline) nothing is ever idle.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        for pool in &plain {
            runtime.spawn(reap_idle(Arc::downgrade(pool)));
        }
    }
    Ok(HttpClient {
        general,
        plain: plain.into(),
    })
}
