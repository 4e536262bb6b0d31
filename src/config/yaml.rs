//! Reading a YAML tree whose every node knows its line and column, collecting every
//! problem instead of stopping at the first (unknown keys, wrong types, bad choices).

use saphyr::{MarkedYamlOwned, ScalarOwned, YamlDataOwned};

use super::diagnostic::{Diagnostic, Pos, hint};

pub type Node = MarkedYamlOwned;

/// The position of a node, 1-based.
#[must_use]
pub fn pos(node: &Node) -> Pos {
    Pos {
        line: node.span.start.line(),
        col: node.span.start.col() + 1,
    }
}

/// Collects diagnostics for one file.
pub struct Reader {
    file: String,
    pub diagnostics: Vec<Diagnostic>,
}

/// A mapping's entries, checked against the keys its owner allows.
pub struct Fields<'n> {
    pub pos: Pos,
    entries: Vec<(String, &'n Node)>,
}

impl<'n> Fields<'n> {
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, v)| k == key && !is_null(v))
            .map(|(_, v)| *v)
    }
}

#[must_use]
pub fn is_null(node: &Node) -> bool {
    matches!(node.data, YamlDataOwned::Value(ScalarOwned::Null))
}

fn kind(node: &Node) -> &'static str {
    match &node.data {
        YamlDataOwned::Value(ScalarOwned::Null) => "nothing",
        YamlDataOwned::Value(ScalarOwned::Boolean(_)) => "a boolean",
        YamlDataOwned::Value(ScalarOwned::Integer(_)) => "an integer",
        YamlDataOwned::Value(ScalarOwned::FloatingPoint(_)) => "a number",
        YamlDataOwned::Value(ScalarOwned::String(_)) | YamlDataOwned::Representation(..) => {
            "a string"
        }
        YamlDataOwned::Sequence(_) => "a list",
        YamlDataOwned::Mapping(_) => "a mapping",
        _ => "an unsupported YAML node",
    }
}

impl Reader {
    #[must_use]
    pub fn new(file: &str) -> Self {
        Self {
            file: file.to_owned(),
            diagnostics: Vec::new(),
        }
    }

    #[must_use]
    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            pos,
            message: message.into(),
        });
    }

    /// Reads a mapping, reporting keys not in `allowed` (with a did-you-mean hint).
    /// `what` names the owner in messages, as in "source `bids`".
    pub fn mapping<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n>> {
        let map = match &node.data {
            YamlDataOwned::Mapping(m) => m,
            _ if is_null(node) => {
                return Some(Fields {
                    pos: pos(node),
                    entries: Vec::new(),
                });
            }
            _ => {
                self.error(
                    pos(node),
                    format!("{what} must be a mapping, found {}", kind(node)),
                );
                return None;
            }
        };
        let mut entries = Vec::with_capacity(map.len());
        for (k, v) in map {
            let Some(key) = scalar_text(k) else {
                self.error(pos(k), format!("keys of {what} must be strings"));
                continue;
            };
            if allowed.contains(&key.as_str()) {
                entries.push((key, v));
            } else {
                let hint = hint(&key, allowed.iter().copied());
                self.error(pos(k), format!("unknown key `{key}` in {what}{hint}"));
            }
        }
        Some(Fields {
            pos: pos(node),
            entries,
        })
    }

    /// A key that must be present.
    pub fn required<'n>(&mut self, fields: &Fields<'n>, key: &str, what: &str) -> Option<&'n Node> {
        let node = fields.get(key);
        if node.is_none() {
            self.error(fields.pos, format!("{what} needs `{key}`"));
        }
        node
    }

    pub fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.data {
            YamlDataOwned::Sequence(_) | YamlDataOwned::Mapping(_) => {
                self.error(
                    pos(node),
                    format!("{what} must be a string, found {}", kind(node)),
                );
                None
            }
            _ => {
                if let Some(s) = scalar_text(node) {
                    Some(s)
                } else {
                    self.error(
                        pos(node),
                        format!("{what} must be a string, found {}", kind(node)),
                    );
                    None
                }
            }
        }
    }

    pub fn u64(&mut self, node: &Node, what: &str) -> Option<u64> {
        let parsed = match &node.data {
            YamlDataOwned::Value(ScalarOwned::Integer(i)) => u64::try_from(*i).ok(),
            YamlDataOwned::Value(ScalarOwned::String(s)) => s.trim().replace('_', "").parse().ok(),
            _ => None,
        };
        if parsed.is_none() {
            let found =
                scalar_text(node).map_or_else(|| kind(node).to_owned(), |t| format!("`{t}`"));
            self.error(
                pos(node),
                format!("{what} must be a whole number >= 0, found {found}"),
            );
        }
        parsed
    }

    /// A whole number of at least 1 (0 is reported as such, and read as absent).
    pub fn positive_u64(&mut self, node: &Node, what: &str) -> Option<u64> {
        match self.u64(node, what)? {
            0 => {
                self.error(pos(node), format!("{what} must be at least 1"));
                None
            }
            v => Some(v),
        }
    }

    pub fn bool(&mut self, node: &Node, what: &str) -> Option<bool> {
        if let YamlDataOwned::Value(ScalarOwned::Boolean(b)) = &node.data {
            return Some(*b);
        }
        self.error(
            pos(node),
            format!("{what} must be true or false, found {}", kind(node)),
        );
        None
    }

    /// One of `names`, mapped through `parse`; an unknown name gets a did-you-mean hint.
    pub fn choice<T>(
        &mut self,
        node: &Node,
        what: &str,
        names: &[&str],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let text = self.string(node, what)?;
        let parsed = parse(&text);
        if parsed.is_none() {
            let hint = hint(&text, names.iter().copied());
            self.error(
                pos(node),
                format!(
                    "unknown {what} `{text}`{hint}; expected one of: {}",
                    names.join(", ")
                ),
            );
        }
        parsed
    }

    pub fn sequence<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [Node]> {
        match &node.data {
            YamlDataOwned::Sequence(s) => Some(s),
            _ if is_null(node) => Some(&[]),
            _ => {
                self.error(
                    pos(node),
                    format!("{what} must be a list, found {}", kind(node)),
                );
                None
            }
        }
    }

    /// A list of strings; a single string is taken as a list of one.
    pub fn strings(&mut self, node: &Node, what: &str) -> Option<Vec<(String, Pos)>> {
        if let YamlDataOwned::Sequence(items) = &node.data {
            let mut out = Vec::new();
            for item in items {
                out.push((self.string(item, what)?, pos(item)));
            }
            return Some(out);
        }
        Some(vec![(self.string(node, what)?, pos(node))])
    }
}

/// A node as JSON text: a string is taken as JSON already written; a mapping or a list
/// is converted (YAML's block style for an Avro schema, say).
#[must_use]
pub fn json_text(node: &Node) -> Option<String> {
    match &node.data {
        YamlDataOwned::Mapping(_) | YamlDataOwned::Sequence(_) => Some(to_json(node).to_string()),
        _ => scalar_text(node),
    }
}

fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value;
    match &node.data {
        YamlDataOwned::Mapping(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (scalar_text(k).unwrap_or_default(), to_json(v)))
                .collect(),
        ),
        YamlDataOwned::Sequence(items) => Value::Array(items.iter().map(to_json).collect()),
        YamlDataOwned::Value(ScalarOwned::Null) => Value::Null,
        YamlDataOwned::Value(ScalarOwned::Boolean(b)) => Value::Bool(*b),
        YamlDataOwned::Value(ScalarOwned::Integer(i)) => Value::from(*i),
        YamlDataOwned::Value(ScalarOwned::FloatingPoint(f)) => {
            serde_json::Number::from_f64(**f).map_or(Value::Null, Value::Number)
        }
        _ => scalar_text(node).map_or(Value::Null, Value::String),
    }
}

/// The text of a scalar node (numbers and booleans as written), or `None` for others.
#[must_use]
pub fn scalar_text(node: &Node) -> Option<String> {
    match &node.data {
        YamlDataOwned::Value(ScalarOwned::String(s)) | YamlDataOwned::Representation(s, _, _) => {
            Some(s.clone())
        }
        YamlDataOwned::Value(ScalarOwned::Integer(i)) => Some(i.to_string()),
        YamlDataOwned::Value(ScalarOwned::FloatingPoint(f)) => Some(f.to_string()),
        YamlDataOwned::Value(ScalarOwned::Boolean(b)) => Some(b.to_string()),
        _ => None,
    }
}
