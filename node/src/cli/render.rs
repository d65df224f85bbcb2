//! How results are printed: a small ordered record type that renders either as an aligned table
//! (for people) or as one compact JSON object per line (for scripts), plus the names of proto
//! enums and timestamps.
//!
//! This file formats only; it must not call the server or decide exit codes.

use cascade_protocol::pb;
use serde_json::{Map, Value};
use std::fmt::Write as _;

/// Output format chosen with `-o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned, human-readable columns.
    Table,
    /// One compact JSON object per result, one per line.
    Json,
}

/// One printable value.
#[derive(Clone, Debug)]
pub enum Val {
    Str(String),
    Num(u64),
    /// A measured quantity; one decimal in tables.
    Float(f64),
    Bool(bool),
    /// A proto enum by its proto name; `*_UNSPECIFIED` prints as `-` in tables.
    Enum(String),
    /// Milliseconds since the Unix epoch; 0 means "none" and prints as `-` in tables.
    TimeMs(u64),
    List(Vec<String>),
    Obj(Record),
    Rows(Vec<Record>),
}

/// An ordered set of named values: the order is the order of table lines and columns.
#[derive(Clone, Debug, Default)]
pub struct Record {
    fields: Vec<(String, Val)>,
}

impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Str(v)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Str(v.to_owned())
    }
}
impl From<u64> for Val {
    fn from(v: u64) -> Val {
        Val::Num(v)
    }
}
impl From<u32> for Val {
    fn from(v: u32) -> Val {
        Val::Num(u64::from(v))
    }
}
impl From<f64> for Val {
    fn from(v: f64) -> Val {
        Val::Float(v)
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Val {
        Val::Bool(v)
    }
}
impl From<Vec<String>> for Val {
    fn from(v: Vec<String>) -> Val {
        Val::List(v)
    }
}
impl From<Record> for Val {
    fn from(v: Record) -> Val {
        Val::Obj(v)
    }
}
impl From<Vec<Record>> for Val {
    fn from(v: Vec<Record>) -> Val {
        Val::Rows(v)
    }
}

impl Record {
    /// An empty record.
    pub fn new() -> Record {
        Record::default()
    }

    /// Appends a field (builder style).
    pub fn with(mut self, name: impl Into<String>, value: impl Into<Val>) -> Record {
        self.fields.push((name.into(), value.into()));
        self
    }

    /// The record as a JSON object (timestamps stay numbers of milliseconds).
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        for (name, value) in &self.fields {
            map.insert(name.clone(), val_json(value));
        }
        Value::Object(map)
    }

    /// The record as text: one `name  value` line per scalar, nested records flattened as
    /// `outer.inner`, and lists of records as column tables under a heading.
    pub fn to_table(&self) -> String {
        let mut lines: Vec<(String, String)> = Vec::new();
        flatten(self, "", &mut lines);
        let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (key, value) in &lines {
            let _ = writeln!(out, "{key:<width$}  {value}");
        }
        for (name, value) in &self.fields {
            if let Val::Rows(rows) = value {
                if !out.is_empty() {
                    out.push('\n');
                }
                if rows.is_empty() {
                    let _ = writeln!(out, "{name}: none");
                } else {
                    let _ = writeln!(out, "{name} ({}):", rows.len());
                    out.push_str(&rows_table(rows));
                }
            }
        }
        out
    }
}

fn flatten(record: &Record, prefix: &str, lines: &mut Vec<(String, String)>) {
    for (name, value) in &record.fields {
        match value {
            Val::Rows(_) => {} // printed as tables after the scalars
            Val::Obj(inner) => flatten(inner, &format!("{prefix}{name}."), lines),
            other => lines.push((format!("{prefix}{name}"), cell(other))),
        }
    }
}

/// A column table of records; the columns are the fields of the first record.
pub fn rows_table(rows: &[Record]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let headers: Vec<&str> = first.fields.iter().map(|(name, _)| name.as_str()).collect();
    let cells: Vec<Vec<String>> =
        rows.iter().map(|row| row.fields.iter().map(|(_, value)| cell(value)).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (i, c) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.len());
            }
        }
    }
    let mut out = String::new();
    let mut line = |items: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, item) in items.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let _ = write!(text, "{item:<w$}  ");
        }
        let _ = writeln!(out, "  {}", text.trim_end());
    };
    line(&mut headers.iter().copied());
    for row in &cells {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn cell(value: &Val) -> String {
    match value {
        Val::Str(s) if s.is_empty() => "-".to_owned(),
        Val::Str(s) => s.clone(),
        Val::Num(n) => n.to_string(),
        Val::Float(x) => format!("{x:.1}"),
        Val::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        Val::Enum(name) if name.ends_with("_UNSPECIFIED") => "-".to_owned(),
        Val::Enum(name) => name.clone(),
        Val::TimeMs(0) => "-".to_owned(),
        Val::TimeMs(ms) => format_time_ms(*ms),
        Val::List(items) if items.is_empty() => "-".to_owned(),
        Val::List(items) => items.join(","),
        Val::Obj(inner) => serde_json::to_string(&inner.to_json()).unwrap_or_default(),
        Val::Rows(rows) => format!("{} rows", rows.len()),
    }
}

fn val_json(value: &Val) -> Value {
    match value {
        Val::Str(s) | Val::Enum(s) => Value::String(s.clone()),
        Val::Num(n) | Val::TimeMs(n) => Value::from(*n),
        // Three decimals are plenty for rates and seconds, and keep the JSON readable.
        Val::Float(x) => Value::from((x * 1000.0).round() / 1000.0),
        Val::Bool(b) => Value::Bool(*b),
        Val::List(items) => Value::Array(items.iter().cloned().map(Value::String).collect()),
        Val::Obj(inner) => inner.to_json(),
        Val::Rows(rows) => Value::Array(rows.iter().map(Record::to_json).collect()),
    }
}

/// Prints one result in the chosen format.
pub fn emit(output: Output, record: &Record) {
    match output {
        Output::Table => print!("{}", record.to_table()),
        Output::Json => println!("{}", record.to_json()),
    }
}

/// Prints several results: a column table under `title`, or one JSON object per line.
pub fn emit_rows(output: Output, title: &str, rows: &[Record]) {
    match output {
        Output::Table if rows.is_empty() => println!("{title}: none"),
        Output::Table => print!("{}", rows_table(rows)),
        Output::Json => {
            for row in rows {
                println!("{}", row.to_json());
            }
        }
    }
}

/// Proto name of a `CheckStatus` value (or `CHECK_STATUS_<n>` for one this build does not know).
pub fn check_status_name(value: i32) -> String {
    pb::CheckStatus::try_from(value)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("CHECK_STATUS_{value}"))
}

/// Proto name of a `ReasonCode` value.
pub fn reason_name(value: i32) -> String {
    pb::ReasonCode::try_from(value)
        .map(|r| r.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("REASON_{value}"))
}

/// `2026-05-01T12:00:00.000Z` for milliseconds since the Unix epoch (UTC, proleptic Gregorian).
pub fn format_time_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Year, month, day of a count of days since 1970-01-01 (H. Hinnant's civil-from-days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A `Freshness` as a nested record (absent freshness prints as zeros).
pub fn freshness(f: Option<&pb::Freshness>) -> Record {
    let f = f.cloned().unwrap_or_default();
    Record::new()
        .with("applied_index", f.applied_index)
        .with("staleness_bound_ms", f.staleness_bound_ms)
        .with("node_id", f.node_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timestamps in tables must be right across leap years and century rules.
    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_time_ms(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
        assert_eq!(format_time_ms(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn json_and_table_agree_on_content() {
        let rec = Record::new()
            .with("session_id", "cs_1")
            .with("status", Val::Enum("VALID".into()))
            .with("reason", Val::Enum("REASON_UNSPECIFIED".into()))
            .with("expires_at_ms", Val::TimeMs(0))
            .with("freshness", Record::new().with("applied_index", 7u64))
            .with("rows", vec![Record::new().with("a", 1u64).with("bb", "x")]);
        let json = rec.to_json();
        assert_eq!(json["status"], "VALID");
        assert_eq!(json["reason"], "REASON_UNSPECIFIED");
        assert_eq!(json["freshness"]["applied_index"], 7);
        assert_eq!(json["rows"][0]["bb"], "x");
        let table = rec.to_table();
        assert!(table.contains("status                   VALID"), "{table}");
        assert!(table.contains("reason                   -"), "{table}");
        assert!(table.contains("freshness.applied_index  7"), "{table}");
        assert!(table.contains("rows (1):\n  a  bb\n  1  x\n"), "{table}");
    }
}
