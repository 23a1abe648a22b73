//! Typed, error-collecting access to a parsed TOML document: unknown keys, types and positions.
//!
//! Serde stops at the first error of a document; the config check must report
//! all of them. So the schema is read table by table from a `toml_edit`
//! document (which keeps the byte span of every key and value): each table
//! declares its keys up front (the `deny_unknown_fields` rule, reporting every
//! unknown key at once), and every getter reports a wrong type at the value and
//! returns `None`, so that reading goes on and later checks still run.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use toml_edit::{Item, Key, TableLike, Value};

use super::error::Sink;

/// A value read from the file, with the byte offset it starts at.
#[derive(Clone, Debug)]
pub(crate) struct At<T> {
    pub(crate) value: T,
    pub(crate) at: usize,
}

impl<T> At<T> {
    pub(crate) fn new(value: T, at: usize) -> Self {
        At { value, at }
    }
}

fn start(span: Option<Range<usize>>) -> Option<usize> {
    span.map(|s| s.start)
}

/// An array of strings as read: the string elements, whether there were only strings,
/// and where the array starts.
pub(crate) struct StrList {
    pub(crate) items: Vec<At<String>>,
    pub(crate) complete: bool,
    pub(crate) at: usize,
}

/// One table of the document (standard `[a.b]`, inline `{ … }` or dotted `a.b.c = …`).
pub(crate) struct Table<'d> {
    table: &'d dyn TableLike,
    /// Dotted path used in messages: `zookeeper`, `volumes.mysql.nbd`.
    pub(crate) path: String,
    /// Where to point for problems of the table as a whole (its header, or the key naming it).
    pub(crate) at: usize,
}

impl<'d> Table<'d> {
    /// The document root.
    pub(crate) fn root(table: &'d dyn TableLike) -> Self {
        Table {
            table,
            path: String::new(),
            at: 0,
        }
    }

    /// `[path]` as written in a header, or "the top level of the file".
    pub(crate) fn describe(&self) -> String {
        if self.path.is_empty() {
            "the top level of the file".to_string()
        } else {
            format!("[{}]", self.path)
        }
    }

    /// The dotted name of one of this table's keys, as used in messages.
    pub(crate) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    /// Reports every key not in `known` (with a "did you mean" hint when one is close).
    pub(crate) fn deny_unknown(&self, sink: &mut Sink<'_>, known: &[&str]) {
        for (key, _) in self.table.iter() {
            if known.contains(&key) {
                continue;
            }
            let at = self.key_span(key).unwrap_or(self.at);
            let hint = match closest(key, known) {
                Some(k) => format!(" (did you mean `{k}`?)"),
                None => format!(" (known keys: {})", known.join(", ")),
            };
            let msg = if self.path.is_empty() {
                format!("unknown top-level key `{key}`{hint}")
            } else {
                format!("unknown key `{key}` in {}{hint}", self.describe())
            };
            sink.at(at, msg);
        }
    }

    /// Iterates over the table's keys in file order.
    pub(crate) fn keys(&self) -> Vec<&'d str> {
        self.table.iter().map(|(k, _)| k).collect()
    }

    fn key_span(&self, key: &str) -> Option<usize> {
        self.table
            .get_key_value(key)
            .and_then(|(k, _): (&Key, &Item)| start(k.span()))
    }

    fn get(&self, key: &str) -> Option<(usize, &'d Item)> {
        let (k, item) = self.table.get_key_value(key)?;
        let at = start(item.span())
            .or_else(|| start(k.span()))
            .unwrap_or(self.at);
        Some((at, item))
    }

    /// Whether the key is present (whatever its type).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Where a sub-table starts (its header, or the key naming it), without checking its type.
    pub(crate) fn table_at(&self, key: &str) -> usize {
        match self.table.get_key_value(key) {
            Some((k, item)) => {
                let key_at = start(k.span()).unwrap_or(self.at);
                header_at(item).unwrap_or(key_at)
            }
            None => self.at,
        }
    }

    /// Where the key is written (its name), for errors about the key as a whole.
    pub(crate) fn key_at(&self, key: &str) -> usize {
        self.key_span(key).unwrap_or(self.at)
    }

    fn value(&self, sink: &mut Sink<'_>, key: &str, expected: &str) -> Option<(usize, &'d Value)> {
        let (at, item) = self.get(key)?;
        match item.as_value() {
            Some(v) => Some((at, v)),
            None => {
                sink.at(
                    at,
                    format!(
                        "`{}` must be {expected}, not {}",
                        self.key_path(key),
                        type_name(item)
                    ),
                );
                None
            }
        }
    }

    /// A string value.
    pub(crate) fn string(&self, sink: &mut Sink<'_>, key: &str) -> Option<At<String>> {
        let (at, v) = self.value(sink, key, "a string")?;
        match v.as_str() {
            Some(s) => Some(At::new(s.to_string(), at)),
            None => {
                sink.at(
                    at,
                    format!(
                        "`{}` must be a string, not {}",
                        self.key_path(key),
                        value_type(v)
                    ),
                );
                None
            }
        }
    }

    /// A boolean value.
    pub(crate) fn boolean(&self, sink: &mut Sink<'_>, key: &str) -> Option<At<bool>> {
        let (at, v) = self.value(sink, key, "true or false")?;
        match v.as_bool() {
            Some(b) => Some(At::new(b, at)),
            None => {
                sink.at(
                    at,
                    format!(
                        "`{}` must be true or false, not {}",
                        self.key_path(key),
                        value_type(v)
                    ),
                );
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub(crate) fn integer(
        &self,
        sink: &mut Sink<'_>,
        key: &str,
        min: i64,
        max: i64,
    ) -> Option<At<i64>> {
        let (at, v) = self.value(sink, key, "an integer")?;
        match v.as_integer() {
            Some(n) if (min..=max).contains(&n) => Some(At::new(n, at)),
            Some(n) => {
                sink.at(
                    at,
                    format!(
                        "`{}` = {n} is out of range: it must be between {min} and {max}",
                        self.key_path(key)
                    ),
                );
                None
            }
            None => {
                sink.at(
                    at,
                    format!(
                        "`{}` must be an integer, not {}",
                        self.key_path(key),
                        value_type(v)
                    ),
                );
                None
            }
        }
    }

    /// A duration written as a string (`"500ms"`, `"3s"`, `"1m"`), parsed with humantime.
    pub(crate) fn duration(&self, sink: &mut Sink<'_>, key: &str) -> Option<At<Duration>> {
        let (at, v) = self.value(sink, key, "a duration string such as \"3s\"")?;
        let Some(s) = v.as_str() else {
            let hint = match v.as_integer() {
                Some(n) => format!(" (write \"{n}s\" or \"{n}ms\")"),
                None => String::new(),
            };
            sink.at(
                at,
                format!(
                    "`{}` must be a duration string such as \"500ms\", \"3s\" or \"1m\", not {}{hint}",
                    self.key_path(key),
                    value_type(v)
                ),
            );
            return None;
        };
        match humantime::parse_duration(s.trim()) {
            Ok(d) => Some(At::new(d, at)),
            Err(e) => {
                sink.at(
                    at,
                    format!(
                        "`{}` = \"{s}\" is not a duration ({e}); write e.g. \"500ms\", \"3s\" or \"1m\"",
                        self.key_path(key)
                    ),
                );
                None
            }
        }
    }

    /// An array of strings; each element keeps its own position. Elements that are
    /// not strings are reported and left out (`complete` is then false).
    pub(crate) fn string_array(&self, sink: &mut Sink<'_>, key: &str) -> Option<StrList> {
        let (at, v) = self.value(sink, key, "an array of strings")?;
        let Some(arr) = v.as_array() else {
            sink.at(
                at,
                format!(
                    "`{}` must be an array of strings, not {}",
                    self.key_path(key),
                    value_type(v)
                ),
            );
            return None;
        };
        let mut items = Vec::new();
        let mut complete = true;
        for (i, el) in arr.iter().enumerate() {
            let el_at = start(el.span()).unwrap_or(at);
            match el.as_str() {
                Some(s) => items.push(At::new(s.to_string(), el_at)),
                None => {
                    sink.at(
                        el_at,
                        format!(
                            "`{}[{i}]` must be a string, not {}",
                            self.key_path(key),
                            value_type(el)
                        ),
                    );
                    complete = false;
                }
            }
        }
        Some(StrList {
            items,
            complete,
            at,
        })
    }

    /// A table of string values (`env = { KEY = "value" }`); keys keep their positions.
    /// Values that are not strings are reported and left out.
    pub(crate) fn string_map(
        &self,
        sink: &mut Sink<'_>,
        key: &str,
    ) -> Option<BTreeMap<String, At<String>>> {
        let sub = self.table(sink, key)?;
        let mut out = BTreeMap::new();
        for k in sub.keys() {
            let key_at = sub.key_at(k);
            if let Some(v) = sub.string(sink, k) {
                out.insert(k.to_string(), At::new(v.value, key_at));
            }
        }
        Some(out)
    }

    /// A sub-table (any TOML form); reports a non-table value.
    pub(crate) fn table(&self, sink: &mut Sink<'_>, key: &str) -> Option<Table<'d>> {
        let (k, item) = self.table.get_key_value(key)?;
        let key_at = start(k.span()).unwrap_or(self.at);
        let path = self.key_path(key);
        match item.as_table_like() {
            Some(t) => {
                // A table with a header points at its header; an implicit or dotted one
                // at the key naming it.
                let at = header_at(item).unwrap_or(key_at);
                Some(Table { table: t, path, at })
            }
            None => {
                let at = start(item.span()).unwrap_or(key_at);
                let hint = if item.is_array_of_tables() {
                    format!(" (write [{path}.NAME] tables, not [[{path}]])")
                } else {
                    String::new()
                };
                sink.at(
                    at,
                    format!("`{path}` must be a table, not {}{hint}", type_name(item)),
                );
                None
            }
        }
    }
}

/// Where a table's header (`[a.b]`) or inline value (`{ … }`) starts; `None` for an
/// implicit or dotted table, which has neither.
fn header_at(item: &Item) -> Option<usize> {
    match item {
        Item::Table(t) if t.is_implicit() || t.is_dotted() => None,
        _ => start(item.span()),
    }
}

/// "a string", "an integer", … for messages.
fn type_name(item: &Item) -> String {
    match item {
        Item::None => "nothing".to_string(),
        Item::Value(v) => value_type(v),
        Item::Table(_) => "a table".to_string(),
        Item::ArrayOfTables(_) => "an array of tables".to_string(),
    }
}

fn value_type(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string \"{}\"", s.value()),
        Value::Integer(i) => format!("the integer {}", i.value()),
        Value::Float(f) => format!("the float {}", f.value()),
        Value::Boolean(b) => format!("the boolean {}", b.value()),
        Value::Datetime(_) => "a date-time".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::InlineTable(_) => "a table".to_string(),
    }
}

/// The known key closest to `key` when it is plausibly a typo (edit distance ≤ 2).
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.min(k.len() / 2).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_suggests_typos_only() {
        let known = ["stop_grace", "suspend_grace", "margin"];
        assert_eq!(closest("stop_grase", &known), Some("stop_grace"));
        assert_eq!(closest("margn", &known), Some("margin"));
        assert_eq!(closest("colour", &known), None);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
