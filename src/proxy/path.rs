//! The path check made before a request is routed.

/// Why a path is refused before it is routed, or `Ok` for one forwarded
/// as it came. The `/v1/` check must hold for the path the upstream
/// serves, and upstreams normalise differently (dot segments, decoded
/// `%2e` and `%2f`, backslashes as slashes): rather than guess how, the
/// gateway refuses every path whose meaning a normaliser could change,
/// as Envoy's `path_with_escaped_slashes_action: REJECT_REQUEST` does.
/// Clients' SDKs never send such paths.
pub(crate) fn check_path(path: &str) -> Result<(), &'static str> {
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
    use super::check_path;

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
}
