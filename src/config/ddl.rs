//! Event time declared in SQL: a source's `sql:` DDL with a `WATERMARK FOR` clause, and
//! `TIMESTAMP BY` in queries.
//!
//! ```sql
//! CREATE SOURCE bids (
//!     auction BIGINT,
//!     price BIGINT,
//!     date_time TIMESTAMP,
//!     WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND
//! )
//! ```
//!
//! declares the same as `schema:` with those columns and `event_time: { column:
//! date_time, watermark_delay_ms: 4000 }`. In a query, `FROM bids TIMESTAMP BY date_time`
//! chooses the event-time column of `bids` when the source does not declare one (and
//! must agree with it when it does).

use laminar_connectors::format::json::DecodeColumn;
use laminar_connectors::format::{ColumnType, parse_column_type};

/// A parsed `CREATE SOURCE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDdl {
    pub name: String,
    pub columns: Vec<DecodeColumn>,
    /// `WATERMARK FOR column AS column - INTERVAL ...`: the column and the delay in ms.
    pub watermark: Option<(String, u64)>,
}

/// Parses `CREATE SOURCE name (column TYPE [NULL | NOT NULL], ..., [WATERMARK FOR ...])`.
pub fn parse_source_ddl(sql: &str) -> Result<SourceDdl, String> {
    let text = sql.trim().trim_end_matches(';').trim_end();
    let mut words = text.splitn(3, char::is_whitespace);
    let (create, source) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if !create.eq_ignore_ascii_case("CREATE") || !source.eq_ignore_ascii_case("SOURCE") {
        return Err(
            "a source's `sql` must be `CREATE SOURCE name (column TYPE, ..., WATERMARK FOR column AS column - INTERVAL 'n' SECOND)`"
                .into(),
        );
    }
    let rest = words.next().unwrap_or("").trim_start();
    let Some(open) = rest.find('(') else {
        return Err("`CREATE SOURCE name (...)` needs a column list in parentheses".into());
    };
    let name = unquote(rest[..open].trim());
    if name.is_empty() {
        return Err("`CREATE SOURCE` needs a name before the column list".into());
    }
    let Some(body) = rest[open + 1..].strip_suffix(')') else {
        return Err("the column list of `CREATE SOURCE` must end with `)`".into());
    };
    let mut columns = Vec::new();
    let mut watermark = None;
    for item in split_top_level(body) {
        let item = item.trim();
        if item.is_empty() {
            return Err("empty column definition in `CREATE SOURCE` (a stray comma?)".into());
        }
        let first = item.split_whitespace().next().unwrap_or("");
        if first.eq_ignore_ascii_case("WATERMARK") {
            if watermark.is_some() {
                return Err("`CREATE SOURCE` declares WATERMARK twice".into());
            }
            watermark = Some(parse_watermark(item)?);
            continue;
        }
        let (column, type_text) = split_name(item);
        let Some((ty, nullable)) = parse_column_type(type_text) else {
            return Err(format!(
                "column `{column}`: unknown type `{}`",
                type_text.trim()
            ));
        };
        if columns.iter().any(|c: &DecodeColumn| c.name == column) {
            return Err(format!("column `{column}` is declared twice"));
        }
        columns.push(DecodeColumn {
            name: column,
            ty,
            nullable,
        });
    }
    if columns.is_empty() {
        return Err("`CREATE SOURCE` declares no columns".into());
    }
    if let Some((column, _)) = &watermark {
        match columns.iter().find(|c| &c.name == column) {
            None => return Err(format!("WATERMARK FOR `{column}`: no such column")),
            Some(c) if !matches!(c.ty, ColumnType::Timestamp(_) | ColumnType::Int64) => {
                return Err(format!(
                    "WATERMARK FOR `{column}`: the column is {}; it must be TIMESTAMP or BIGINT (epoch milliseconds)",
                    c.ty.sql_name()
                ));
            }
            Some(_) => {}
        }
    }
    Ok(SourceDdl {
        name,
        columns,
        watermark,
    })
}

fn unquote(s: &str) -> String {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
        .to_owned()
}

/// A column definition's name (maybe quoted) and the rest.
fn split_name(item: &str) -> (String, &str) {
    if let Some(quoted) = item.strip_prefix('"')
        && let Some(end) = quoted.find('"')
    {
        return (quoted[..end].to_owned(), &quoted[end + 1..]);
    }
    let end = item.find(char::is_whitespace).unwrap_or(item.len());
    (item[..end].to_owned(), &item[end..])
}

/// Splits at commas outside parentheses and quotes.
fn split_top_level(body: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut quote, mut start) = (Vec::new(), 0_i32, None, 0);
    for (i, c) in body.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => depth -= 1,
            (None, ',') if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            // Inside quotes, or any other character.
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
}

/// `WATERMARK FOR c AS c [- INTERVAL 'n' UNIT | - INTERVAL 'n UNIT']`.
fn parse_watermark(item: &str) -> Result<(String, u64), String> {
    const FORM: &str = "expected `WATERMARK FOR column AS column - INTERVAL 'n' SECOND` (or MILLISECOND, MINUTE, HOUR)";
    let tokens: Vec<String> = item
        .replace('-', " - ")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let word = |i: usize, w: &str| tokens.get(i).is_some_and(|t| t.eq_ignore_ascii_case(w));
    if !(word(0, "WATERMARK") && word(1, "FOR") && word(3, "AS")) {
        return Err(FORM.into());
    }
    let (column, expr) = (
        unquote(&tokens[2]),
        unquote(tokens.get(4).map_or("", |s| s)),
    );
    if expr != column {
        return Err(format!(
            "WATERMARK FOR `{column}` must be `{column}` minus an interval, not `{expr}`"
        ));
    }
    if tokens.len() == 5 {
        return Ok((column, 0));
    }
    if !(word(5, "-") && word(6, "INTERVAL")) {
        return Err(FORM.into());
    }
    // The quoted amount, and the unit inside the quotes or after them.
    let rest = tokens[7..].join(" ");
    let Some(quoted) = rest.strip_prefix('\'') else {
        return Err(FORM.into());
    };
    let Some(end) = quoted.find('\'') else {
        return Err(FORM.into());
    };
    let inside: Vec<&str> = quoted[..end].split_whitespace().collect();
    let after: Vec<&str> = quoted[end + 1..].split_whitespace().collect();
    let (amount, unit) = match (inside.as_slice(), after.as_slice()) {
        ([n], [unit]) | ([n, unit], []) => (*n, *unit),
        _ => return Err(FORM.into()),
    };
    let amount: u64 = amount
        .parse()
        .map_err(|_| format!("WATERMARK interval `{amount}` is not a whole number"))?;
    let unit_ms: u64 = match unit.to_ascii_uppercase().trim_end_matches('S') {
        "MILLISECOND" => 1,
        "SECOND" => 1000,
        "MINUTE" => 60_000,
        "HOUR" => 3_600_000,
        _ => return Err(format!("WATERMARK interval unit `{unit}`: {FORM}")),
    };
    amount
        .checked_mul(unit_ms)
        .map(|ms| (column, ms))
        .ok_or_else(|| "WATERMARK interval is too large".into())
}

/// A `TIMESTAMP BY` clause found in a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampBy {
    /// The relation named just before it (`FROM bids TIMESTAMP BY ts`).
    pub relation: String,
    pub column: String,
    /// Byte offset of `TIMESTAMP` in the SQL text.
    pub offset: usize,
}

/// Finds `TIMESTAMP BY column` clauses outside literals and comments and blanks them out
/// of `sql` (with spaces, so that error positions in the rest stay right).
pub fn take_timestamp_by(sql: &mut String) -> Result<Vec<TimestampBy>, (usize, String)> {
    let tokens = tokenize(sql);
    let mut found = Vec::new();
    let mut i = 0;
    while i + 1 < tokens.len() {
        let t = &tokens[i];
        if t.word && !t.quoted && t.text.eq_ignore_ascii_case("TIMESTAMP") && {
            let by = &tokens[i + 1];
            by.word && !by.quoted && by.text.eq_ignore_ascii_case("BY")
        } {
            let Some(column) = tokens.get(i + 2).filter(|c| c.word) else {
                return Err((t.start, "`TIMESTAMP BY` needs a column name".into()));
            };
            let Some(relation) = i.checked_sub(1).map(|p| &tokens[p]).filter(|r| r.word) else {
                return Err((
                    t.start,
                    "`TIMESTAMP BY` must follow a source name (`FROM source TIMESTAMP BY column`)"
                        .into(),
                ));
            };
            found.push(TimestampBy {
                relation: relation.text.clone(),
                column: column.text.clone(),
                offset: t.start,
            });
            let (start, end) = (t.start, column.end);
            let blank: String = sql[start..end]
                .chars()
                .map(|c| if c == '\n' { '\n' } else { ' ' })
                .collect();
            sql.replace_range(start..end, &blank);
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(found)
}

struct Token {
    text: String,
    start: usize,
    end: usize,
    word: bool,
    quoted: bool,
}

/// Words (identifiers, keywords, numbers), quoted identifiers and single punctuation;
/// string literals and comments are skipped.
fn tokenize(sql: &str) -> Vec<Token> {
    let bytes = sql.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'-' && bytes.get(i + 1) == Some(&b'-') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i = sql[i + 2..]
                .find("*/")
                .map_or(bytes.len(), |e| i + 2 + e + 2);
        } else if c == b'\'' {
            // A string literal; '' inside is an escaped quote.
            i += 1;
            while i < bytes.len() {
                if bytes[i] == b'\'' {
                    if bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            i += 1;
        } else if c == b'"' {
            let end = sql[i + 1..].find('"').map_or(bytes.len(), |e| i + 1 + e);
            tokens.push(Token {
                text: sql[i + 1..end].to_owned(),
                start: i,
                end: (end + 1).min(bytes.len()),
                word: true,
                quoted: true,
            });
            i = end + 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] >= 0x80)
            {
                i += 1;
            }
            tokens.push(Token {
                text: sql[start..i].to_owned(),
                start,
                end: i,
                word: true,
                quoted: false,
            });
        } else {
            tokens.push(Token {
                text: (c as char).to_string(),
                start: i,
                end: i + 1,
                word: false,
                quoted: false,
            });
            i += 1;
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use laminar_connectors::format::types::EpochUnit;

    #[test]
    fn create_source_declares_columns_and_the_watermark() {
        let ddl = parse_source_ddl(
            "CREATE SOURCE bids (\n  auction BIGINT,\n  \"Price\" DOUBLE NULL,\n  at TIMESTAMP(6),\n  date_time TIMESTAMP,\n  WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND\n);",
        )
        .unwrap();
        assert_eq!(ddl.name, "bids");
        let names: Vec<&str> = ddl.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["auction", "Price", "at", "date_time"]);
        assert!(ddl.columns[1].nullable);
        assert_eq!(ddl.columns[2].ty, ColumnType::Timestamp(EpochUnit::Micros));
        assert_eq!(ddl.watermark, Some(("date_time".into(), 4000)));
        for (clause, ms) in [
            ("ts AS ts - INTERVAL '250' MILLISECONDS", 250),
            ("ts AS ts - INTERVAL '2 minutes'", 120_000),
            ("ts AS ts-INTERVAL '1' HOUR", 3_600_000),
            ("ts AS ts", 0),
        ] {
            let ddl = parse_source_ddl(&format!(
                "create source s (ts BIGINT, watermark for {clause})"
            ))
            .unwrap();
            assert_eq!(ddl.watermark, Some(("ts".into(), ms)), "{clause}");
        }
        assert_eq!(
            parse_source_ddl("CREATE SOURCE s (a BIGINT)")
                .unwrap()
                .watermark,
            None
        );
    }

    #[test]
    fn create_source_errors_name_the_problem() {
        for (sql, wanted) in [
            ("SELECT 1", "must be `CREATE SOURCE"),
            ("CREATE SOURCE s (a BIGNUM)", "unknown type `BIGNUM`"),
            ("CREATE SOURCE s (a BIGINT, a BIGINT)", "declared twice"),
            (
                "CREATE SOURCE s (a BIGINT, WATERMARK FOR b AS b)",
                "no such column",
            ),
            (
                "CREATE SOURCE s (a VARCHAR, WATERMARK FOR a AS a)",
                "must be TIMESTAMP",
            ),
            (
                "CREATE SOURCE s (a BIGINT, WATERMARK FOR a AS a - INTERVAL '1' WEEK)",
                "unit `WEEK`",
            ),
            (
                "CREATE SOURCE s (a BIGINT, WATERMARK FOR a AS a + 1)",
                "expected `WATERMARK FOR",
            ),
            (
                "CREATE SOURCE s (a BIGINT, WATERMARK FOR a AS b - INTERVAL '1' SECOND)",
                "not `b`",
            ),
            ("CREATE SOURCE s (a BIGINT,)", "stray comma"),
            ("CREATE SOURCE s (a BIGINT", "must end with `)`"),
        ] {
            let e = parse_source_ddl(sql).unwrap_err();
            assert!(e.contains(wanted), "{sql}: {e}");
        }
    }

    #[test]
    fn timestamp_by_is_found_and_blanked_outside_literals_and_comments() {
        let mut sql = "SELECT 'TIMESTAMP BY x' AS s -- TIMESTAMP BY y\nFROM bids TIMESTAMP BY date_time WHERE a > 1".to_owned();
        let (len, at) = (sql.len(), sql.find("TIMESTAMP BY date").unwrap());
        let found = take_timestamp_by(&mut sql).unwrap();
        assert_eq!(
            found,
            [TimestampBy {
                relation: "bids".into(),
                column: "date_time".into(),
                offset: at,
            }]
        );
        assert_eq!(sql.len(), len, "positions are kept");
        let blanked = format!(
            "FROM bids {} WHERE",
            " ".repeat("TIMESTAMP BY date_time".len())
        );
        assert!(sql.contains(&blanked), "{sql}");
        assert!(sql.contains("'TIMESTAMP BY x'") && sql.contains("-- TIMESTAMP BY y"));
        assert!(take_timestamp_by(&mut "SELECT * FROM s TIMESTAMP BY".to_owned()).is_err());
        assert!(take_timestamp_by(&mut "SELECT 1, TIMESTAMP BY t FROM s".to_owned()).is_err());
    }
}
