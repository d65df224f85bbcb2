//! The comparison of `htu` with the request URL.
//!
//! Both sides are reduced to `scheme://host[:port]/path`: the fragment and the query are dropped,
//! the scheme and host are lowercased (ASCII only), a default port (`:443` for https, `:80` for
//! http) is dropped, and an empty path becomes `/`. The path is compared byte for byte: no
//! percent-decoding and no removal of `.` or `..` segments. Only http and https URLs are
//! accepted, without user information (`user@`), spaces or control characters.

/// Normalizes a URL for comparison; `None` when it is not an absolute http(s) URL.
pub(crate) fn normalize(url: &str) -> Option<String> {
    if url.chars().any(|c| c.is_control() || c == ' ') {
        return None;
    }
    let without_fragment = url.split('#').next()?;
    let without_query = without_fragment.split('?').next()?;
    let (scheme, rest) = without_query.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let host = authority.strip_suffix(default_port).unwrap_or(&authority);
    if host.is_empty() || host.starts_with(':') {
        return None;
    }
    Some(format!("{scheme}://{host}/{path}"))
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn query_fragment_case_and_default_port_are_ignored() {
        let want = Some("https://api.example.com/v1/x".to_owned());
        assert_eq!(normalize("https://api.example.com/v1/x"), want);
        assert_eq!(normalize("HTTPS://API.Example.COM:443/v1/x?a=b#frag"), want);
        assert_eq!(normalize("https://api.example.com/v1/x#frag?not-a-query"), want);
        assert_eq!(normalize("http://h:80"), Some("http://h/".to_owned()));
        assert_eq!(normalize("http://[::1]:80/p"), Some("http://[::1]/p".to_owned()));
    }

    #[test]
    fn other_ports_and_path_case_are_kept() {
        assert_eq!(normalize("http://h:443/p"), Some("http://h:443/p".to_owned()));
        assert_eq!(normalize("https://h:8443/P"), Some("https://h:8443/P".to_owned()));
    }

    #[test]
    fn non_http_and_malformed_urls_are_refused() {
        for url in [
            "",
            "/relative/path",
            "ftp://h/p",
            "https:/h/p",
            "https:///p",
            "https://:443/p",
            "https://:8443/p",
            "https://user@h/p",
            "https://h/p q",
            "https://h/p\n",
        ] {
            assert_eq!(normalize(url), None, "{url:?}");
        }
    }
}
