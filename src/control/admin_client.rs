//! The client side of `abgate rollout`: one admin API call, its JSON answer.

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::proxy::body::Body;

/// Sends `method path` with an optional JSON body and bearer token; returns
/// the status and the JSON answer, or a message saying why there is none.
pub async fn call(
    admin_url: &str,
    method: http::Method,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Result<(http::StatusCode, serde_json::Value), String> {
    let url = format!("{}{path}", admin_url.trim_end_matches('/'));
    let mut request = Request::builder().method(method).uri(&url);
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = body.map_or_else(Body::empty, |json| {
        Body::full(Bytes::from(json.to_string()))
    });
    let request = request
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|err| format!("{url}: {err}"))?;
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(10), client.request(request))
            .await
            .map_err(|_| format!("{url}: no answer within 10 s"))?
            .map_err(|err| format!("{url}: {err}"))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|err| format!("{url}: {err}"))?
        .to_bytes();
    let json = serde_json::from_slice(&bytes)
        .map_err(|_| format!("{url}: answered {status} with a body that is not JSON"))?;
    Ok((status, json))
}
