//! The requests a run sends, built once as bytes: the head up to the user
//! header, one value per synthetic user, and the rest of the head with the
//! body. Writing a request is then three copies into a kept buffer, no
//! formatting.

use std::net::{SocketAddr, ToSocketAddrs};

use abgate_http1::framing as http1;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::Uri;

/// Where requests go and what they carry.
pub struct RequestTemplate {
    /// The server's address, resolved once.
    pub addr: SocketAddr,
    /// The request line and every field but the user's, up to the user
    /// header's name and colon.
    head: Vec<u8>,
    users: Vec<HeaderValue>,
    /// The end of the user's field and of the head, and the body.
    tail: Vec<u8>,
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
        let path = url.path_and_query().map_or("/", |pq| pq.as_str());
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|err| format!("--url {:?}: {err}", spec.url))?;
        let user_header = HeaderName::from_bytes(spec.user_header.as_bytes())
            .map_err(|err| format!("--user-header {:?}: {err}", spec.user_header))?;
        let users = (0..spec.users.max(1))
            .map(|n| HeaderValue::from_str(&format!("user-{n}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("user IDs: {err}"))?;
        let body = chat_body(spec.model, spec.stream);
        let mut head = format!("POST {path} HTTP/1.1\r\n").into_bytes();
        http1::write_field(&mut head, b"host", host.as_bytes());
        http1::write_field(&mut head, b"content-type", b"application/json");
        http1::write_content_length(&mut head, body.len() as u64);
        for pair in spec.headers {
            let (name, value) = pair
                .split_once(':')
                .ok_or_else(|| format!("--header {pair:?}: expected `name: value`"))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|err| format!("--header {pair:?}: {err}"))?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|err| format!("--header {pair:?}: {err}"))?;
            http1::write_field(&mut head, name.as_str().as_bytes(), value.as_bytes());
        }
        head.extend_from_slice(user_header.as_str().as_bytes());
        head.extend_from_slice(b": ");
        let mut tail = b"\r\n\r\n".to_vec();
        tail.extend_from_slice(&body);
        Ok(Self {
            addr,
            head,
            users,
            tail,
        })
    }

    /// Distinct users the requests are spread over.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Writes the request of user number `user` (taken modulo the user
    /// count) into `out`, replacing what it held.
    pub fn write(&self, user: usize, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.head);
        if let Some(id) = self.users.get(user % self.users.len()) {
            out.extend_from_slice(id.as_bytes());
        }
        out.extend_from_slice(&self.tail);
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
        let mut written = b"left over".to_vec();
        template.write(4, &mut written);
        let mut fields = [httparse::EMPTY_HEADER; 8];
        let mut request = httparse::Request::new(&mut fields);
        let httparse::Status::Complete(head) = request.parse(&written).unwrap() else {
            panic!("a partial head: {}", String::from_utf8_lossy(&written));
        };
        assert_eq!(request.method, Some("POST"));
        assert_eq!(request.path, Some("/v1/chat/completions"));
        let field = |name: &str| {
            let found = request.headers.iter().filter(|field| field.name == name);
            found.map(|field| field.value).collect::<Vec<_>>()
        };
        assert_eq!(field("host"), [b"127.0.0.1:8080"]);
        assert_eq!(field("x-user-id"), [b"user-1"]);
        assert_eq!(field("x-mock-chunks"), [b"200"]);
        assert_eq!(field("content-type"), [b"application/json"]);
        let body = &written[head..];
        let length = body.len().to_string();
        assert_eq!(field("content-length"), [length.as_bytes()]);
        let body: serde_json::Value = serde_json::from_slice(body).unwrap();
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
