//! DNS name rules (RFC 1123) shared by every crate that checks names: certificate SANs,
//! role URIs, cluster names, namespaces, Kubernetes object names.

/// RFC 1123 DNS label of at most `max_len` characters: lowercase alphanumerics and '-',
/// starting and ending alphanumeric.
pub fn is_dns_label(s: &str, max_len: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max_len
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// RFC 1123 DNS subdomain: dot-separated labels of at most 63 characters, at most 253 in all.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| is_dns_label(l, 63))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        assert!(is_dns_label("east-1", 63));
        assert!(!is_dns_label("East", 63));
        assert!(!is_dns_label("-a", 63));
        assert!(!is_dns_label("a-", 63));
        assert!(!is_dns_label("", 63));
        assert!(!is_dns_label(&"a".repeat(33), 32));
        assert!(is_dns_subdomain("a.b-c.d"));
        assert!(!is_dns_subdomain("a..b"));
    }
}
