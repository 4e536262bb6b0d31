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

/// Where a reference was replaced, in the output text: 1-based line, and the 1-based
/// columns (characters) the value starts at and ends before. Lets the loader tell a
/// secret that came from the environment from one written in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Substitution {
    pub line: usize,
    pub col_start: usize,
    pub col_end: usize,
    /// The value is the reference's `:-default`, written in the file.
    pub from_default: bool,
}

/// What [`interpolate`] produced.
#[derive(Debug, Default)]
pub struct Interpolated {
    pub text: String,
    pub missing: Vec<Missing>,
    pub substitutions: Vec<Substitution>,
}

/// Replaces every reference using `lookup`.
pub fn interpolate(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Interpolated {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    let mut substitutions = Vec::new();
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        let mut col = 1;
        // The column in the output line, which values longer or shorter than their
        // references shift.
        let mut out_col = 1;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let skipped = rest[..i].chars().count();
            col += skipped;
            out_col += skipped;
            let after = &rest[i..];
            if let Some(escaped) = after.strip_prefix("$${") {
                out.push_str("${");
                rest = escaped;
                col += 3;
                out_col += 2;
                continue;
            }
            let Some(body_end) = after.starts_with("${").then(|| after.find('}')).flatten() else {
                out.push('$');
                rest = &after[1..];
                col += 1;
                out_col += 1;
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
                out_col += 1;
                continue;
            }
            let found = lookup(name);
            let from_default = found.is_none();
            match found.or_else(|| default.map(str::to_owned)) {
                Some(value) => {
                    let len = value.chars().count();
                    substitutions.push(Substitution {
                        line: line_no + 1,
                        col_start: out_col,
                        col_end: out_col + len,
                        from_default,
                    });
                    out_col += len;
                    out.push_str(&value);
                }
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
    Interpolated {
        text: out,
        missing,
        substitutions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOST").then(|| "kafka:9092".to_owned())
    }

    #[test]
    fn interpolate_replaces_defaults_and_reports_missing() {
        let Interpolated {
            text,
            missing,
            substitutions,
        } = interpolate(
            "a: ${HOST}\nb: ${PORT:-9092} $${HOST} $5\nc: x${NOPE}\n",
            &env,
        );
        assert_eq!(text, "a: kafka:9092\nb: 9092 ${HOST} $5\nc: x\n");
        assert_eq!(
            substitutions,
            vec![
                Substitution {
                    line: 1,
                    col_start: 4,
                    col_end: 14,
                    from_default: false
                },
                Substitution {
                    line: 2,
                    col_start: 4,
                    col_end: 8,
                    from_default: true
                },
            ]
        );
        assert_eq!(
            missing,
            vec![Missing {
                name: "NOPE".into(),
                pos: Pos { line: 3, col: 5 }
            }]
        );
    }
}
