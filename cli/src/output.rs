//! `-o json` and `-o yaml` of the same values: JSON as it is, YAML written from it (block style,
//! strings double-quoted as JSON writes them, which YAML reads the same).

use serde_json::Value;

use crate::Output;

/// Prints `v` as `output` asks (`Text` callers print their own tables).
pub fn print(output: Output, v: &Value) {
    match output {
        Output::Yaml => print!("{}", yaml(v)),
        _ => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

/// One YAML document.
pub fn yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => block(v, 0, &mut out),
        Value::Array(a) if !a.is_empty() => block(v, 0, &mut out),
        _ => {
            out.push_str(&scalar(v));
            out.push('\n');
        }
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(m) if m.is_empty() => "{}".into(),
        _ => String::new(),
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty()) || matches!(v, Value::Array(a) if !a.is_empty())
}

fn key(k: &str) -> String {
    let plain = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
    if plain { k.to_string() } else { serde_json::to_string(k).unwrap_or_default() }
}

fn block(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if is_block(x) {
                    out.push_str(&format!("{pad}{}:\n", key(k)));
                    block(x, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{}: {}\n", key(k), scalar(x)));
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                if is_block(x) {
                    // The first line of the item on the dash's line, the rest indented under it.
                    let mut inner = String::new();
                    block(x, indent + 2, &mut inner);
                    let rest = inner.get(indent + 2..).unwrap_or("");
                    out.push_str(&format!("{pad}- {rest}"));
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(x)));
                }
            }
        }
        _ => out.push_str(&format!("{pad}{}\n", scalar(v))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::yaml;

    #[test]
    fn yaml_of_nested_values() {
        let v = json!({
            "name": "demo",
            "ranks": [{"rank": 0, "gpus": [0, 1], "exit_code": null}, {"rank": 1, "gpus": []}],
            "env": {},
            "labels": {"zone a": "x: y"},
        });
        let want = "name: \"demo\"\nranks:\n  - rank: 0\n    gpus:\n      - 0\n      - 1\n    exit_code: null\n  - rank: 1\n    gpus: []\nenv: {}\nlabels:\n  \"zone a\": \"x: y\"\n";
        // serde_json keeps keys sorted (no preserve_order): the same order here.
        let mut sorted = String::new();
        let v2: serde_json::Value = serde_json::from_str(&v.to_string()).expect("json");
        sorted.push_str(&yaml(&v2));
        assert_eq!(
            sorted,
            "env: {}\nlabels:\n  \"zone a\": \"x: y\"\nname: \"demo\"\nranks:\n  - exit_code: null\n    gpus:\n      - 0\n      - 1\n    rank: 0\n  - gpus: []\n    rank: 1\n",
            "{want}"
        );
        assert_eq!(yaml(&json!([])), "[]\n");
        assert_eq!(yaml(&json!("a\nb")), "\"a\\nb\"\n");
    }
}
