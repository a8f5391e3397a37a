//! The requests a run sends, built once: a shared body, one header value per
//! synthetic user, and the extra headers. Sending a request then costs a
//! few reference-count increments and header inserts, no formatting.

use std::net::{SocketAddr, ToSocketAddrs};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::Full;

/// Where requests go and what they carry.
pub struct RequestTemplate {
    /// The server's address, resolved once.
    pub addr: SocketAddr,
    host: HeaderValue,
    path: Uri,
    body: Bytes,
    user_header: HeaderName,
    users: Vec<HeaderValue>,
    extra: HeaderMap,
}

/// What the template is made from (the command line's view).
pub struct TemplateSpec<'a> {
    /// `http://host:port/path`.
    pub url: &'a str,
    /// Distinct synthetic user IDs, `user-0` to `user-{users-1}`.
    pub users: usize,
    /// Header carrying the user ID.
    pub user_header: &'a str,
    /// Ask for an SSE stream (`"stream": true`).
    pub stream: bool,
    /// `name: value` pairs added to every request.
    pub headers: &'a [String],
    /// The chat body's `model`.
    pub model: &'a str,
}

impl RequestTemplate {
    /// Resolves the URL and builds every user's header value.
    pub fn new(spec: &TemplateSpec) -> Result<Self, String> {
        let url: Uri = spec
            .url
            .parse()
            .map_err(|err| format!("--url {:?}: {err}", spec.url))?;
        if url.scheme_str() != Some("http") {
            return Err(format!("--url {:?}: only http:// is supported", spec.url));
        }
        let authority = url
            .authority()
            .ok_or_else(|| format!("--url {:?}: no host", spec.url))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = (authority.host(), port)
            .to_socket_addrs()
            .map_err(|err| format!("--url {:?}: {err}", spec.url))?
            .next()
            .ok_or_else(|| format!("--url {:?}: the host has no address", spec.url))?;
        let path: Uri = url
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse()
            .map_err(|err| format!("--url {:?}: {err}", spec.url))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|err| format!("--url {:?}: {err}", spec.url))?;
        let user_header = HeaderName::from_bytes(spec.user_header.as_bytes())
            .map_err(|err| format!("--user-header {:?}: {err}", spec.user_header))?;
        let users = (0..spec.users.max(1))
            .map(|n| HeaderValue::from_str(&format!("user-{n}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("user IDs: {err}"))?;
        let mut extra = HeaderMap::new();
        for pair in spec.headers {
            let (name, value) = pair
                .split_once(':')
                .ok_or_else(|| format!("--header {pair:?}: expected `name: value`"))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|err| format!("--header {pair:?}: {err}"))?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|err| format!("--header {pair:?}: {err}"))?;
            extra.append(name, value);
        }
        Ok(Self {
            addr,
            host,
            path,
            body: chat_body(spec.model, spec.stream),
            user_header,
            users,
            extra,
        })
    }

    /// Distinct users the requests are spread over.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The request for user number `user` (taken modulo the user count).
    pub fn build(&self, user: usize) -> Result<Request<Full<Bytes>>, http::Error> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.path.clone())
            .body(Full::new(self.body.clone()))?;
        let headers = request.headers_mut();
        headers.reserve(4 + self.extra.len());
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(id) = self.users.get(user % self.users.len()) {
            headers.insert(self.user_header.clone(), id.clone());
        }
        for (name, value) in &self.extra {
            headers.append(name.clone(), value.clone());
        }
        Ok(request)
    }
}

/// A small OpenAI chat completion request, as an SDK would send it.
fn chat_body(model: &str, stream: bool) -> Bytes {
    let body = serde_json::json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful support assistant. Answer briefly."},
            {"role": "user", "content": "My order has not arrived yet. What can I do?"},
        ],
        "temperature": 0.2,
        "max_tokens": 256,
        "stream": stream,
    });
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(url: &str, headers: &[String]) -> Result<RequestTemplate, String> {
        RequestTemplate::new(&TemplateSpec {
            url,
            users: 3,
            user_header: "x-user-id",
            stream: true,
            headers,
            model: "gpt-4o-mini",
        })
    }

    #[test]
    fn requests_carry_the_user_the_host_and_the_extra_headers() {
        let headers = ["x-mock-chunks: 200".to_owned()];
        let template = template("http://127.0.0.1:8080/v1/chat/completions", &headers).unwrap();
        assert_eq!(template.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(template.user_count(), 3);
        let request = template.build(4).unwrap();
        assert_eq!(request.uri(), "/v1/chat/completions");
        assert_eq!(request.headers()["host"], "127.0.0.1:8080");
        assert_eq!(request.headers()["x-user-id"], "user-1");
        assert_eq!(request.headers()["x-mock-chunks"], "200");
        let body: serde_json::Value = serde_json::from_slice(&template.body).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["model"], "gpt-4o-mini");
    }

    #[test]
    fn bad_urls_and_headers_are_explained() {
        assert!(template("https://127.0.0.1/v1", &[])
            .err()
            .unwrap()
            .contains("only http://"));
        assert!(template("http://127.0.0.1/v1", &["novalue".to_owned()])
            .err()
            .unwrap()
            .contains("name: value"));
    }
}
