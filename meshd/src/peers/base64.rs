//! Base64 as kubeconfig `*-data` fields use it (standard alphabet, padded; line breaks
//! tolerated like Go's decoder), on top of the `base64` crate.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Encodes with the standard padded alphabet.
pub(crate) fn encode(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// Decodes, ignoring ASCII whitespace (line breaks in wrapped values).
pub(crate) fn decode(text: &str) -> Result<Vec<u8>, &'static str> {
    let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    STANDARD
        .decode(compact)
        .map_err(|_| "not base64 (standard alphabet, padded)")
}
