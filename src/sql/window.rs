//! The streaming SQL surface `DataFusion` does not know: `TUMBLE(src, ts, size)`,
//! `HOP(src, ts, slide, size)` and `SESSION(src, ts, gap)` in FROM, and a trailing
//! `EMIT ON WINDOW CLOSE | EMIT ON UPDATE | EMIT EVERY INTERVAL 'n' SECOND` clause.
//!
//! The EMIT clause is cut from the text (replaced by spaces, so that positions of the
//! rest stay put). Window calls are rewritten in the parsed statement into a scan of a
//! table named `__window_N` whose schema is the input's plus `window_start` and
//! `window_end` (aliased as the input, so that `bids.price` still resolves); the
//! [`WindowCall`] remembers what it stands for.

use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr as LogicalExpr, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::{
    self, FunctionArg, FunctionArgExpr, Ident, ObjectName, ObjectNamePart, SetExpr, TableAlias,
    TableFactor,
};

use crate::config::EmitPolicy;
use crate::operator::window::WindowKind;

/// A window table function found in a query.
#[derive(Debug, Clone)]
pub struct WindowCall {
    /// The name of the table that replaces it in the plan.
    pub table: String,
    /// The source or query it reads.
    pub input: String,
    /// The event-time column.
    pub time_column: String,
    pub kind: WindowKind,
}

/// Cuts a trailing EMIT clause; returns the SQL with it blanked and the policy it sets.
pub fn take_emit(sql: &str) -> Result<(String, Option<EmitPolicy>), String> {
    let upper = sql.to_ascii_uppercase();
    let Some(at) = find_word(&upper, "EMIT") else {
        return Ok((sql.to_owned(), None));
    };
    let clause: Vec<&str> = upper[at..].split_whitespace().collect();
    let clause: Vec<&str> = clause
        .iter()
        .map(|w| w.trim_end_matches(';'))
        .filter(|w| !w.is_empty())
        .collect();
    let policy = match clause.as_slice() {
        ["EMIT", "ON", "WINDOW", "CLOSE"] | ["EMIT", "ON", "WATERMARK"] | ["EMIT", "FINAL"] => {
            EmitPolicy::OnWindowClose
        }
        ["EMIT", "ON", "UPDATE"] | ["EMIT", "CHANGES"] => EmitPolicy::OnUpdate,
        ["EMIT", "EVERY", "INTERVAL", n, unit] => {
            let n: u64 = n
                .trim_matches('\'')
                .parse()
                .map_err(|_| format!("EMIT EVERY: `{n}` is not a whole number"))?;
            let ms = match unit.trim_end_matches('S') {
                "MILLISECOND" => n,
                "SECOND" => n * 1000,
                "MINUTE" => n * 60_000,
                "HOUR" => n * 3_600_000,
                other => {
                    return Err(format!(
                        "EMIT EVERY: unknown unit `{other}` (use MILLISECOND, SECOND, MINUTE or HOUR)"
                    ));
                }
            };
            if ms == 0 {
                return Err("EMIT EVERY needs an interval of at least 1 ms".into());
            }
            EmitPolicy::EveryMs(ms)
        }
        _ => {
            return Err(format!(
                "unrecognised `{}`; expected EMIT ON WINDOW CLOSE, EMIT ON UPDATE or EMIT EVERY INTERVAL 'n' SECOND at the end of the query",
                clause.join(" ")
            ));
        }
    };
    let blanked: String = sql[..at].to_owned()
        + &sql[at..]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect::<String>();
    Ok((blanked, Some(policy)))
}

/// The byte offset of `word` as a whole word outside quotes in `upper`.
fn find_word(upper: &str, word: &str) -> Option<usize> {
    let bytes = upper.as_bytes();
    let mut in_quote = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\'' {
            in_quote = !in_quote;
        } else if !in_quote
            && upper[i..].starts_with(word)
            && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric() && bytes[i - 1] != b'_')
            && bytes
                .get(i + word.len())
                .is_none_or(|b| !b.is_ascii_alphanumeric() && *b != b'_')
        {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Finds window calls in `statement`'s FROM clauses and rewrites them into scans of
/// `__window_N` tables. `interval_ms` turns an interval expression into milliseconds.
pub fn rewrite_windows(
    statement: &mut Statement,
    interval_ms: &dyn Fn(&ast::Expr) -> Result<i64, String>,
) -> Result<Vec<WindowCall>, String> {
    let mut calls = Vec::new();
    let Statement::Statement(s) = statement else {
        return Ok(calls);
    };
    let ast::Statement::Query(query) = s.as_mut() else {
        return Ok(calls);
    };
    rewrite_set_expr(&mut query.body, interval_ms, &mut calls)?;
    Ok(calls)
}

fn rewrite_set_expr(
    body: &mut SetExpr,
    interval_ms: &dyn Fn(&ast::Expr) -> Result<i64, String>,
    calls: &mut Vec<WindowCall>,
) -> Result<(), String> {
    match body {
        SetExpr::Select(select) => {
            rewrite_group_by_window(select, interval_ms, calls)?;
            for from in &mut select.from {
                rewrite_factor(&mut from.relation, interval_ms, calls)?;
                for join in &mut from.joins {
                    rewrite_factor(&mut join.relation, interval_ms, calls)?;
                }
            }
            Ok(())
        }
        SetExpr::Query(q) => rewrite_set_expr(&mut q.body, interval_ms, calls),
        SetExpr::SetOperation { left, right, .. } => {
            rewrite_set_expr(left, interval_ms, calls)?;
            rewrite_set_expr(right, interval_ms, calls)
        }
        _ => Ok(()),
    }
}

fn rewrite_factor(
    factor: &mut TableFactor,
    interval_ms: &dyn Fn(&ast::Expr) -> Result<i64, String>,
    calls: &mut Vec<WindowCall>,
) -> Result<(), String> {
    match factor {
        TableFactor::Table {
            name,
            alias,
            args: args @ Some(_),
            ..
        } => {
            let function = name.to_string().to_ascii_lowercase();
            if !matches!(function.as_str(), "tumble" | "hop" | "session") {
                return Ok(());
            }
            let list: Vec<&ast::Expr> = args
                .as_ref()
                .map(|a| a.args.iter())
                .into_iter()
                .flatten()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
                    _ => Err(format!("{} takes plain arguments", function.to_uppercase())),
                })
                .collect::<Result<_, _>>()?;
            let usage = match function.as_str() {
                "tumble" => "TUMBLE(source, time_column, size)",
                "hop" => "HOP(source, time_column, slide, size)",
                _ => "SESSION(source, time_column, gap)",
            };
            let expected = if function == "hop" { 4 } else { 3 };
            if list.len() != expected {
                return Err(format!("expected {usage}"));
            }
            let ident = |e: &ast::Expr, what: &str| match e {
                ast::Expr::Identifier(i) => Ok(i.value.clone()),
                ast::Expr::CompoundIdentifier(parts) => Ok(parts
                    .iter()
                    .map(|p| p.value.as_str())
                    .collect::<Vec<_>>()
                    .join(".")),
                other => Err(format!(
                    "{usage}: the {what} must be a name, found `{other}`"
                )),
            };
            let input = ident(list[0], "source")?;
            let time_column = ident(list[1], "time column")?;
            let kind = window_kind(&function, &list[2..], interval_ms)?;
            let table = rename_to_window_table(name, alias, &input, calls.len());
            *args = None;
            calls.push(WindowCall {
                table,
                input,
                time_column,
                kind,
            });
            Ok(())
        }
        TableFactor::Derived { subquery, .. } => {
            rewrite_set_expr(&mut subquery.body, interval_ms, calls)
        }
        _ => Ok(()),
    }
}

/// The seed's form, `FROM src ... GROUP BY key, TUMBLE(ts, size)` (also HOP(ts, slide,
/// size) and SESSION(ts, gap)): the same as `FROM TUMBLE(src, ts, size) ... GROUP BY key,
/// window_start, window_end`.
fn rewrite_group_by_window(
    select: &mut ast::Select,
    interval_ms: &dyn Fn(&ast::Expr) -> Result<i64, String>,
    calls: &mut Vec<WindowCall>,
) -> Result<(), String> {
    let ast::GroupByExpr::Expressions(exprs, _) = &mut select.group_by else {
        return Ok(());
    };
    let found = exprs.iter().enumerate().find_map(|(i, e)| match e {
        ast::Expr::Function(f) => {
            let name = f.name.to_string().to_ascii_lowercase();
            matches!(name.as_str(), "tumble" | "hop" | "session").then(|| (i, name, f.clone()))
        }
        _ => None,
    });
    let Some((at, function, call)) = found else {
        return Ok(());
    };
    let usage = match function.as_str() {
        "tumble" => "GROUP BY ..., TUMBLE(time_column, size)",
        "hop" => "GROUP BY ..., HOP(time_column, slide, size)",
        _ => "GROUP BY ..., SESSION(time_column, gap)",
    };
    let ast::FunctionArguments::List(list) = &call.args else {
        return Err(format!("expected {usage}"));
    };
    let args: Vec<&ast::Expr> = list
        .args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
            _ => Err(format!("expected {usage}")),
        })
        .collect::<Result<_, _>>()?;
    let expected = if function == "hop" { 3 } else { 2 };
    if args.len() != expected {
        return Err(format!("expected {usage}"));
    }
    let ast::Expr::Identifier(time_column) = args[0] else {
        return Err(format!("{usage}: the time column must be a column name"));
    };
    let [from] = select.from.as_mut_slice() else {
        return Err(format!("{usage} needs exactly one source or query in FROM"));
    };
    if !from.joins.is_empty() {
        return Err(format!("{usage} cannot be used with a JOIN"));
    }
    let TableFactor::Table {
        name,
        alias,
        args: None,
        ..
    } = &mut from.relation
    else {
        return Err(format!("{usage} needs a source or query name in FROM"));
    };
    let input = name.to_string();
    let kind = window_kind(&function, &args[1..], interval_ms)?;
    let table = rename_to_window_table(name, alias, &input, calls.len());
    exprs.splice(
        at..=at,
        [
            ast::Expr::Identifier(Ident::new("window_start")),
            ast::Expr::Identifier(Ident::new("window_end")),
        ],
    );
    calls.push(WindowCall {
        table,
        input,
        time_column: time_column.value.clone(),
        kind,
    });
    Ok(())
}

/// The window of `function` (`tumble`, `hop`, `session`) from its interval arguments
/// (size; slide and size; gap), checked.
fn window_kind(
    function: &str,
    intervals: &[&ast::Expr],
    interval_ms: &dyn Fn(&ast::Expr) -> Result<i64, String>,
) -> Result<WindowKind, String> {
    let kind = match function {
        "tumble" => WindowKind::Tumble {
            size_ms: interval_ms(intervals[0])?,
        },
        "hop" => WindowKind::Hop {
            slide_ms: interval_ms(intervals[0])?,
            size_ms: interval_ms(intervals[1])?,
        },
        _ => WindowKind::Session {
            gap_ms: interval_ms(intervals[0])?,
        },
    };
    kind.validate()?;
    Ok(kind)
}

/// Points a FROM entry at the `n`th window table, aliased as the input (when it has no
/// alias) so that `input.column` still resolves; returns the table's name.
fn rename_to_window_table(
    name: &mut ObjectName,
    alias: &mut Option<TableAlias>,
    input: &str,
    n: usize,
) -> String {
    let table = format!("__window_{n}");
    *name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(&table))]);
    if alias.is_none() {
        *alias = Some(TableAlias {
            explicit: true,
            name: Ident::new(input),
            columns: Vec::new(),
            at: None,
        });
    }
    table
}

/// Plans `SELECT <expr>` to read an interval literal as milliseconds.
pub fn interval_ms(ctx: &SessionContext, expr: &ast::Expr) -> Result<i64, String> {
    let state = ctx.state();
    let plan = futures::executor::block_on(state.create_logical_plan(&format!("SELECT {expr}")))
        .and_then(|p| state.optimize(&p))
        .map_err(|e: DataFusionError| {
            format!("`{expr}` is not an interval: {}", e.strip_backtrace())
        })?;
    let LogicalPlan::Projection(p) = &plan else {
        return Err(format!("`{expr}` is not a constant interval"));
    };
    let value = match p.expr.first() {
        Some(LogicalExpr::Literal(v, _)) => v.clone(),
        Some(LogicalExpr::Alias(a)) => match a.expr.as_ref() {
            LogicalExpr::Literal(v, _) => v.clone(),
            _ => return Err(format!("`{expr}` is not a constant interval")),
        },
        _ => return Err(format!("`{expr}` is not a constant interval")),
    };
    let ms = match value {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
            i64::from(v.days) * 86_400_000 + v.nanoseconds / 1_000_000
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            i64::from(v.days) * 86_400_000 + i64::from(v.milliseconds)
        }
        ScalarValue::IntervalMonthDayNano(Some(_)) | ScalarValue::IntervalYearMonth(_) => {
            return Err(format!(
                "`{expr}`: months and years have no fixed length; use days"
            ));
        }
        other => {
            return Err(format!(
                "`{expr}` is {}, not an interval",
                other.data_type()
            ));
        }
    };
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_emit_blanks_the_clause_and_reads_the_policy() {
        let (sql, p) = take_emit("SELECT a FROM t\nEMIT ON UPDATE").unwrap();
        assert_eq!(sql, "SELECT a FROM t\n              ");
        assert_eq!(p, Some(EmitPolicy::OnUpdate));
        assert_eq!(take_emit("SELECT 'emit' FROM t").unwrap().1, None);
        assert_eq!(
            take_emit("select a from t emit every interval '5' seconds;")
                .unwrap()
                .1,
            Some(EmitPolicy::EveryMs(5000))
        );
        assert_eq!(
            take_emit("SELECT a FROM t EMIT ON WINDOW CLOSE").unwrap().1,
            Some(EmitPolicy::OnWindowClose)
        );
        assert!(take_emit("SELECT a FROM t EMIT SOMETIMES").is_err());
    }
}
