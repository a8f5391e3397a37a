//! HTTPS upstreams: rustls with a private CA from `ca_file`, HTTP/2 chosen by
//! ALPN, and a refusal when the certificate is not trusted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};

/// A TLS front for a mock on loopback: terminates TLS (offering h2 and
/// http/1.1) and pipes the plaintext to the mock. Records the ALPN protocol
/// each connection chose.
async fn tls_front(
    backend: std::net::SocketAddr,
    dir: &std::path::Path,
) -> (String, std::path::PathBuf, Arc<Mutex<Vec<String>>>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, certified.cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(certified.cert.der().to_vec())],
        key,
    )
    .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let protocols = Arc::new(Mutex::new(Vec::new()));
    let seen = protocols.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let alpn = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                seen.lock().unwrap().push(alpn.unwrap_or_default());
                let mut plain = TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (format!("https://localhost:{port}"), ca_file, protocols)
}

#[tokio::test]
async fn https_upstreams_with_a_private_ca_speak_http2() {
    let (control, treatment) = mocks().await;
    let dir = fresh_dir("tls-ok");
    let (url, ca_file, protocols) = tls_front(treatment.addr, &dir).await;
    let toml = config_toml(&control.url(), &url, 1.0, "").replace(
        "model = \"ft:base-model:acme:v3\"",
        &format!(
            "model = \"ft:base-model:acme:v3\"\nca_file = {:?}",
            ca_file.display().to_string()
        ),
    );
    let gw = gateway(&toml).await;
    for user in ["a", "b", "c"] {
        let answer = chat(&gw.url(), user).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.header("x-abgate-variant"), "treatment");
        assert_eq!(answer.json()["model"], "ft:base-model:acme:v3");
    }
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let answer = post(
        &gw.url(),
        "/v1/chat/completions",
        &[("x-user-id", "s")],
        body,
    )
    .await;
    assert!(answer.text().trim_end().ends_with("data: [DONE]"));
    let protocols = protocols.lock().unwrap().clone();
    assert_eq!(
        protocols,
        ["h2"],
        "one pooled HTTP/2 connection carried every request"
    );
    assert_eq!(treatment.request_count(), 4);
    // The client's Host named the gateway; the upstream is told its own
    // name (HTTP/2's :authority), not the gateway's.
    let gateway_host = gw.proxy_addr.to_string();
    for request in treatment.requests() {
        assert_ne!(
            request
                .headers
                .get("host")
                .and_then(|host| host.to_str().ok()),
            Some(gateway_host.as_str())
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_502_naming_the_variant() {
    let (control, treatment) = mocks().await;
    let dir = fresh_dir("tls-untrusted");
    let (url, _ca_file, _) = tls_front(treatment.addr, &dir).await;
    let gw = gateway(&config_toml(&control.url(), &url, 1.0, "")).await;
    let answer = chat(&gw.url(), "a").await;
    assert_eq!(answer.status, 502);
    let json = answer.json();
    assert_eq!(json["error"]["variant"], "treatment");
    assert_eq!(json["error"]["code"], "connect");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.to_lowercase().contains("certificate"), "{message}");
    assert_eq!(treatment.request_count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
