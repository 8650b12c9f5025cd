//! Field validation shared by every gRPC edge: errors name the field, the value and the rule.

use std::collections::HashMap;

/// A request field that breaks a rule. Maps to gRPC `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

pub fn max_len(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        return Err(FieldError::new(field, format!("{} bytes long; at most {max} allowed", value.len())));
    }
    Ok(())
}

/// Node names: 1-63 characters of lowercase letters, digits, '-', '_' and '.', starting and ending
/// with a letter or digit (a DNS label, plus '_' and '.', which host names use in practice).
pub fn node_name(field: &str, value: &str) -> Result<(), FieldError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.');
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if value.is_empty()
        || value.len() > 63
        || !value.chars().all(ok_char)
        || !edge(value.chars().next())
        || !edge(value.chars().last())
    {
        return Err(FieldError::new(
            field,
            format!(
                "{value:?} is not a valid node name: use 1-63 lowercase letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// Labels: at most 64, keys 1-63 characters of `[A-Za-z0-9._/-]`, values at most 256 bytes.
pub fn labels(field: &str, labels: &HashMap<String, String>) -> Result<(), FieldError> {
    if labels.len() > 64 {
        return Err(FieldError::new(field, format!("{} labels; at most 64 allowed", labels.len())));
    }
    for (k, v) in labels {
        label_pair(field, k, v)?;
    }
    Ok(())
}

pub fn label_pair(field: &str, k: &str, v: &str) -> Result<(), FieldError> {
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
    if !key_ok {
        return Err(FieldError::new(
            field,
            format!("label key {k:?} is invalid: use 1-63 letters, digits, '.', '_', '/' or '-'"),
        ));
    }
    if v.len() > 256 || v.chars().any(|c| c.is_control()) {
        return Err(FieldError::new(
            field,
            format!("label {k:?} has an invalid value: at most 256 bytes, no control characters"),
        ));
    }
    Ok(())
}

/// Parses `k=v,k2=v2` (the `--labels` flag) into validated pairs.
pub fn parse_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, FieldError> {
    let mut out = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            FieldError::new("--labels", format!("{part:?} is not KEY=VALUE; write e.g. zone=a,rack=12"))
        })?;
        label_pair("--labels", k.trim(), v.trim())?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["a", "node-1", "gpu01.rack3", "worker_2"] {
            assert!(node_name("n", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Node", "a b", &"x".repeat(64)] {
            let e = node_name("n", bad).expect_err(bad);
            assert!(e.message.contains("not a valid node name"), "{e}");
        }
    }

    #[test]
    fn labels_parse_and_reject() {
        let l = parse_labels("zone=a, rack=12").expect("valid");
        assert_eq!(l.get("zone").map(String::as_str), Some("a"));
        assert_eq!(l.get("rack").map(String::as_str), Some("12"));
        assert!(parse_labels("").expect("empty ok").is_empty());
        assert!(parse_labels("zone").expect_err("no =").message.contains("KEY=VALUE"));
        assert!(parse_labels("bad key=1").is_err());
    }
}
