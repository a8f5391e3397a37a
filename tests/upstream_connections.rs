//! Connections to plain-HTTP upstreams: kept open and reused between
//! requests, and replaced when the upstream closes them while idle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

const BODY: &[u8] = br#"{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

/// A keep-alive answer: the connection may carry more requests.
fn kept_alive_answer() -> Vec<u8> {
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        BODY.len()
    )
    .into_bytes();
    answer.extend_from_slice(BODY);
    answer
}

/// An upstream that answers every request on a connection until the
/// gateway closes it, or, with `close_after`, closes each connection that
/// long after its first answer. Returns its URL and its connection count.
async fn keep_alive_upstream(close_after: Option<Duration>) -> (String, Arc<AtomicUsize>) {
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let url = scripted_upstream(move |_, mut socket| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = socket.write_all(&kept_alive_answer()).await;
            if let Some(after) = close_after {
                tokio::time::sleep(after).await;
                return;
            }
            while read_request(&mut socket).await.is_some() {
                let _ = socket.write_all(&kept_alive_answer()).await;
            }
        }
    })
    .await;
    (url, connections)
}

#[tokio::test]
async fn sequential_requests_share_an_upstream_connection() {
    let (upstream, connections) = keep_alive_upstream(None).await;
    let gw = gateway(&config_toml(&upstream, &upstream, 0.5, "")).await;
    for user in 0..10 {
        let answer = bounded(chat(&gw.url(), &format!("user-{user}"))).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    // One connection, or two if a request came in the instant before the
    // first was handed back; never one per request.
    let opened = connections.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&opened),
        "{opened} connections for 10 requests"
    );
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_replaced() {
    let (upstream, connections) = keep_alive_upstream(Some(Duration::from_millis(20))).await;
    let gw = gateway(&config_toml(&upstream, &upstream, 0.5, "")).await;
    for user in 0..3 {
        let answer = bounded(chat(&gw.url(), &format!("user-{user}"))).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        // Long enough for the upstream to close the connection just used.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}
