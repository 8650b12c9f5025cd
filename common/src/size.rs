//! Human byte sizes: `80GiB`, `512MiB`, `1.5TiB`, `40GB`, `1024`.

use std::fmt;

/// A parsing error for sizes, naming the value and the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {value:?}: {why}; write a number with a unit such as 80GiB, 512MiB or 40GB")]
pub struct SizeError {
    pub value: String,
    pub why: &'static str,
}

const UNITS: &[(&str, u64)] = &[
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("ki", 1 << 10),
    ("mi", 1 << 20),
    ("gi", 1 << 30),
    ("ti", 1 << 40),
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    ("t", 1 << 40),
    ("b", 1),
    ("", 1),
];

/// Parses a human size into bytes. Binary units (KiB, MiB, GiB, TiB, Kubernetes' Ki, Mi, Gi, Ti and
/// the short K, M, G, T) are
/// powers of 1024; decimal units (KB, MB, GB, TB) powers of 1000.
pub fn parse_size(value: &str) -> Result<u64, SizeError> {
    let err = |why| SizeError { value: value.to_string(), why };
    let s = value.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(err("no number"));
    }
    let unit = unit.trim().to_ascii_lowercase();
    let mult = UNITS.iter().find(|(u, _)| *u == unit).map(|(_, m)| *m).ok_or_else(|| err("unknown unit"))?;
    let n: f64 = num.parse().map_err(|_| err("not a number"))?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(err("too large"));
    }
    Ok(bytes.round() as u64)
}

/// Bytes shown with a binary unit and at most one decimal: `80GiB`, `1.5TiB`, `512MiB`.
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut i = 0;
        while v >= 1024.0 && i + 1 < NAMES.len() {
            v /= 1024.0;
            i += 1;
        }
        if i == 0 || (v - v.round()).abs() < 0.05 {
            write!(f, "{}{}", v.round() as u64, NAMES[i])
        } else {
            write!(f, "{:.1}{}", v, NAMES[i])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        let cases = [
            ("80GiB", 80u64 << 30),
            ("80gib", 80 << 30),
            ("80G", 80 << 30),
            ("512MiB", 512 << 20),
            ("1.5TiB", 3 << 39),
            ("40GB", 40_000_000_000),
            ("1024", 1024),
            ("7b", 7),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_garbage_with_the_value_in_the_message() {
        for bad in ["", "GiB", "80 parsecs", "1.2.3G", "1e400"] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn formats_round_trip_readably() {
        assert_eq!(HumanBytes(80 << 30).to_string(), "80GiB");
        assert_eq!(HumanBytes(3 << 39).to_string(), "1.5TiB");
        assert_eq!(HumanBytes(1000).to_string(), "1000B");
        assert_eq!(HumanBytes(141_557_760 * 1024).to_string(), "135GiB");
    }
}
