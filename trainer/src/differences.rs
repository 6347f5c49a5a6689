//! What differs between two settings as JSON values, by dotted key: the words of a refusal
//! ("the checkpoint was written with other settings (checkpoint vs now: batch_size: 4 vs 8)").

use serde_json::Value;

/// The longest value a difference quotes (a longer one is cut, with its length said).
const QUOTED: usize = 60;

/// One line per key whose value differs between `before` and `now`, as
/// `key: <before> vs <now>` (`absent` where a side lacks the key); objects are compared key
/// by key, every other value whole. Empty when they are equal.
pub fn differences(before: &Value, now: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk("", before, now, &mut out);
    out
}

fn walk(key: &str, before: &Value, now: &Value, out: &mut Vec<String>) {
    match (before, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if key.is_empty() { k.clone() } else { format!("{key}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => walk(&sub, x, y, out),
                    (x, y) => out.push(line(&sub, x, y)),
                }
            }
        }
        _ if before != now => out.push(line(key, Some(before), Some(now))),
        _ => {}
    }
}

fn line(key: &str, before: Option<&Value>, now: Option<&Value>) -> String {
    let key = if key.is_empty() { "the value" } else { key };
    format!("{key}: {} vs {}", quote(before), quote(now))
}

fn quote(v: Option<&Value>) -> String {
    let Some(v) = v else { return "absent".into() };
    let text = v.to_string();
    if text.chars().count() <= QUOTED {
        return text;
    }
    let cut: String = text.chars().take(QUOTED).collect();
    format!("{cut}… ({} characters)", text.chars().count())
}

/// `items` joined by `; `, at most `max` of them, with how many were left out.
pub fn listed(items: &[String], max: usize) -> String {
    let mut text = items.iter().take(max).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > max {
        text.push_str(&format!("; and {} more", items.len() - max));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_each_differing_key_with_both_values() {
        let a = json!({"train": {"batch_size": 4, "seed": 1, "lisa": {"lambda": 0.2}}, "gone": true});
        let b = json!({"train": {"batch_size": 8, "seed": 1, "lisa": {"lambda": 0.5}}, "new": [1, 2]});
        assert_eq!(
            differences(&a, &b),
            [
                "gone: true vs absent",
                "new: absent vs [1,2]",
                "train.batch_size: 4 vs 8",
                "train.lisa.lambda: 0.2 vs 0.5",
            ]
        );
        assert!(differences(&a, &a).is_empty());
        let long = json!({"k": "x".repeat(200)});
        let d = differences(&long, &json!({"k": 1}));
        assert!(d[0].contains("… (202 characters) vs 1"), "{d:?}");
        assert_eq!(listed(&d, 1), d[0]);
        assert_eq!(listed(&["a".into(), "b".into(), "c".into()], 2), "a; b; and 1 more");
    }
}
