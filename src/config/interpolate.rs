//! `${VAR}` and `${VAR:-default}` in pipeline files, replaced before YAML parsing;
//! `$${` stands for a literal `${`. A variable that is unset and has no default is an
//! error naming it (and where it is used).

use super::diagnostic::Pos;

/// An unset variable without a default, and where it was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub name: String,
    pub pos: Pos,
}

/// Replaces every reference using `lookup`; returns the text and the missing variables.
pub fn interpolate(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> (String, Vec<Missing>) {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        let mut col = 1;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            col += rest[..i].chars().count();
            let after = &rest[i..];
            if let Some(escaped) = after.strip_prefix("$${") {
                out.push_str("${");
                rest = escaped;
                col += 3;
                continue;
            }
            let Some(body_end) = after.starts_with("${").then(|| after.find('}')).flatten() else {
                out.push('$');
                rest = &after[1..];
                col += 1;
                continue;
            };
            let body = &after[2..body_end];
            let (name, default) = match body.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (body, None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                out.push('$');
                rest = &after[1..];
                col += 1;
                continue;
            }
            match lookup(name).or_else(|| default.map(str::to_owned)) {
                Some(value) => out.push_str(&value),
                None => missing.push(Missing {
                    name: name.to_owned(),
                    pos: Pos {
                        line: line_no + 1,
                        col,
                    },
                }),
            }
            col += after[..=body_end].chars().count();
            rest = &after[body_end + 1..];
        }
        out.push_str(rest);
    }
    (out, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOST").then(|| "kafka:9092".to_owned())
    }

    #[test]
    fn interpolate_replaces_defaults_and_reports_missing() {
        let (text, missing) = interpolate(
            "a: ${HOST}\nb: ${PORT:-9092} $${HOST} $5\nc: x${NOPE}\n",
            &env,
        );
        assert_eq!(text, "a: kafka:9092\nb: 9092 ${HOST} $5\nc: x\n");
        assert_eq!(
            missing,
            vec![Missing {
                name: "NOPE".into(),
                pos: Pos { line: 3, col: 5 }
            }]
        );
    }
}
