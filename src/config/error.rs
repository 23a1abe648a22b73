//! Config errors: each names FILE:LINE:COLUMN and the rule broken; [`ConfigErrors`] collects them all.

use std::fmt;
use std::ops::Range;

/// One problem found in a config file.
///
/// Displays as `FILE:LINE:COL: error: MESSAGE`. Errors about the file as a whole
/// (it cannot be read) have no position: line and column are 0 and the display
/// is `FILE: error: MESSAGE`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    file: String,
    line: usize,
    column: usize,
    message: String,
}

impl ConfigError {
    /// An error at a 1-based line and column of `file`.
    pub fn new(
        file: impl Into<String>,
        line: usize,
        column: usize,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.into(),
            line,
            column,
            message: message.into(),
        }
    }

    /// An error about the file as a whole (no position), such as "cannot read".
    pub fn whole_file(file: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    /// The file name, as given to [`super::load`] or [`super::parse`].
    pub fn file(&self) -> &str {
        &self.file
    }

    /// 1-based line, or 0 for an error about the whole file.
    pub fn line(&self) -> usize {
        self.line
    }

    /// 1-based column (in characters), or 0 for an error about the whole file.
    pub fn column(&self) -> usize {
        self.column
    }

    /// The rule broken, in plain words (no position, no `error:` prefix).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: error: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: error: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// Every problem found in one config file, in file order; displays one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    file: String,
    errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// Wraps a list of errors about `file` (sorted by position, duplicates dropped).
    pub fn new(file: impl Into<String>, mut errors: Vec<ConfigError>) -> Self {
        // Stable sort: errors at the same position keep the order they were found in.
        errors.sort_by_key(|e| (e.line, e.column));
        errors.dedup();
        ConfigErrors {
            file: file.into(),
            errors,
        }
    }

    /// The file the errors are about.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The errors, in file order.
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// Iterates over the errors, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.errors.iter()
    }

    /// How many errors.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Whether there are none (never the case for an `Err` from [`super::parse`]).
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

/// Collects errors while the file is read, turning byte offsets into lines and columns.
pub(crate) struct Sink<'s> {
    src: &'s str,
    file: &'s str,
    errors: Vec<ConfigError>,
}

impl<'s> Sink<'s> {
    pub(crate) fn new(src: &'s str, file: &'s str) -> Self {
        Sink {
            src,
            file,
            errors: Vec::new(),
        }
    }

    /// Records an error at byte offset `at` of the source.
    pub(crate) fn at(&mut self, at: usize, message: impl Into<String>) {
        let (line, column) = line_col(self.src, at);
        self.errors
            .push(ConfigError::new(self.file, line, column, message));
    }

    /// Records an error at the start of `span` (or of the file when there is none).
    pub(crate) fn span(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        self.at(span.map_or(0, |s| s.start), message);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub(crate) fn into_errors(self) -> ConfigErrors {
        ConfigErrors::new(self.file, self.errors)
    }
}

/// 1-based line and column (counted in characters) of byte offset `at` in `src`.
pub(crate) fn line_col(src: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(src.len());
    while !src.is_char_boundary(at) {
        at -= 1;
    }
    let before = &src[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_lines_and_characters() {
        let src = "a = 1\nbé = 2\n\nc";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 4), (1, 5));
        assert_eq!(line_col(src, 6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_col(src, 9), (2, 3));
        assert_eq!(line_col(src, src.len()), (4, 2));
        assert_eq!(line_col(src, 10_000), (4, 2));
    }

    #[test]
    fn errors_display_one_per_line_in_file_order() {
        let errs = ConfigErrors::new(
            "f.toml",
            vec![
                ConfigError::new("f.toml", 7, 1, "second"),
                ConfigError::new("f.toml", 2, 3, "first"),
                ConfigError::new("f.toml", 2, 3, "first"),
            ],
        );
        assert_eq!(errs.len(), 2);
        assert_eq!(
            errs.to_string(),
            "f.toml:2:3: error: first\nf.toml:7:1: error: second"
        );
        assert_eq!(
            ConfigError::whole_file("x", "gone").to_string(),
            "x: error: gone"
        );
    }
}
