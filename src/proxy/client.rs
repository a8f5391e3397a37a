//! The pooled HTTP client that talks to upstreams: HTTP/1.1 or HTTP/2 (by
//! ALPN) over rustls, plain HTTP/1.1 for `http://` upstreams.

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::{read_pem_certs, Snapshot};

/// The upstream client; cloning shares the connection pool.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Builds the client for a config: public web roots plus every `ca_file`.
pub fn build(snapshot: &Snapshot) -> Result<HttpClient, String> {
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
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https))
}
