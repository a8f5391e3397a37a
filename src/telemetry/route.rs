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
    pub(crate) fn classify(path: &str) -> Option<Route> {
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
    pub(crate) fn takes_json(self) -> bool {
        !matches!(self, Route::Other)
    }

    /// The label used in metrics and events.
    pub(crate) const fn as_str(self) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::Route;

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
