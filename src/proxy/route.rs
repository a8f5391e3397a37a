//! The API family of a path: a bounded label for metrics and events, never
//! the raw path (which may carry IDs).

/// API family of a proxied request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// OpenAI `/v1/chat/completions`
    Chat,
    /// Anthropic `/v1/messages`
    Messages,
    /// OpenAI legacy `/v1/completions`
    Completions,
    /// OpenAI `/v1/embeddings`
    Embeddings,
    /// OpenAI `/v1/responses` and its sub-paths
    Responses,
    /// Any other `/v1/` path, forwarded as is
    Other,
}

impl Route {
    /// Classifies a path; `None` for paths outside `/v1/`.
    pub fn classify(path: &str) -> Option<Route> {
        let rest = path.strip_prefix("/v1/")?;
        let rest = rest.trim_end_matches('/');
        Some(match rest {
            "chat/completions" => Route::Chat,
            "messages" => Route::Messages,
            "completions" => Route::Completions,
            "embeddings" => Route::Embeddings,
            "responses" => Route::Responses,
            _ if rest.starts_with("responses/") => Route::Responses,
            _ => Route::Other,
        })
    }

    /// Whether the route's POST body is a JSON object by definition, so it
    /// is read as JSON whatever its content type says.
    pub fn takes_json(self) -> bool {
        !matches!(self, Route::Other)
    }

    /// The label used in metrics and events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Route::Chat => "chat",
            Route::Messages => "messages",
            Route::Completions => "completions",
            Route::Embeddings => "embeddings",
            Route::Responses => "responses",
            Route::Other => "other",
        }
    }
}

/// Why a path is refused before it is routed, or `Ok` for one forwarded
/// as it came. The `/v1/` check must hold for the path the upstream
/// serves, and upstreams normalise differently (dot segments, decoded
/// `%2e` and `%2f`, backslashes as slashes): rather than guess how, the
/// gateway refuses every path whose meaning a normaliser could change,
/// as Envoy's `path_with_escaped_slashes_action: REJECT_REQUEST` does.
/// Clients' SDKs never send such paths.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    let bytes = path.as_bytes();
    // The usual path has none of the bytes that start a refusal.
    if !bytes
        .iter()
        .any(|&byte| matches!(byte, b'.' | b'%' | b'\\'))
    {
        return Ok(());
    }
    if bytes.contains(&b'\\') {
        return Err("has a backslash");
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err("has an encoded slash or backslash");
    }
    if lower.contains("%00") {
        return Err("has an encoded NUL");
    }
    let dot_segment = lower
        .split('/')
        .map(|segment| segment.replace("%2e", "."))
        .any(|segment| segment == "." || segment == "..");
    if dot_segment {
        return Err("has a dot segment (. or .., perhaps percent-encoded)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{check_path, Route};

    #[test]
    fn paths_a_normaliser_could_move_are_refused() {
        for path in [
            "/v1/../x",
            "/v1/%2e%2e/x",
            "/v1/%2E%2e/x",
            "/v1/./../x",
            "/v1/.%2e/x",
            "/v1/%2e./x",
            "/v1/..",
            "/v1/.",
            "/v1/chat/completions/..",
            "/v1/a%2fb",
            "/v1/a%2F..%2Fb",
            "/v1/a%5cb",
            "/v1/a\\..\\b",
            "/v1/a%00",
        ] {
            assert!(check_path(path).is_err(), "{path}");
        }
        for path in [
            "/v1/chat/completions",
            "/v1/files/file-abc.jsonl",
            "/v1/...",
            "/v1/.well-known",
            "/v1/a..b",
            "/v1/models/ft%3Abase%3Aacme",
            "/v1//models",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn classifies_api_families() {
        assert_eq!(Route::classify("/v1/chat/completions"), Some(Route::Chat));
        assert_eq!(Route::classify("/v1/messages"), Some(Route::Messages));
        assert_eq!(
            Route::classify("/v1/messages/count_tokens"),
            Some(Route::Other)
        );
        assert_eq!(
            Route::classify("/v1/responses/resp_1"),
            Some(Route::Responses)
        );
        assert_eq!(Route::classify("/v1/models"), Some(Route::Other));
        assert_eq!(Route::classify("/v2/chat"), None);
        assert_eq!(Route::classify("/"), None);
    }
}
