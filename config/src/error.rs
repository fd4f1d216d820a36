//! The crate's error type: every message renders as one line,
//! `<file>:<line>:<col>: <key path>: <message>`.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Where in a configuration a problem was found.
///
/// Renders as `<source>[:<line>:<column>][: <key>]`, for example
/// `halfsync.toml:9:11: group[0].workers`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Location {
    /// The file path as given, `<embedded config>` or `<config>`.
    pub source: String,
    /// 1-based line and column (column counted in characters), when known.
    pub line_col: Option<(usize, usize)>,
    /// The key path, such as `server.ring_size`, `group[0].workers` or
    /// `group "b"`; `None` for problems with the document as a whole.
    pub key: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if let Some((line, col)) = self.line_col {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong while loading a configuration.
///
/// `Display` is always a single line (control characters coming from the
/// input are escaped) of the form
/// `<file>:<line>:<col>: <key path>: <message>`; the line, column and key
/// path parts are left out where unknown or not applicable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file could not be read.
    #[error("{}: cannot read config file: {}", one_line(&.path.display().to_string()), one_line(&.error.to_string()))]
    Read {
        /// The path that was given.
        path: PathBuf,
        /// The underlying I/O error (already in the message, so not a
        /// `source()`: `{:#}` would print it twice).
        error: io::Error,
    },
    /// The text is not valid TOML.
    #[error("{location}: {message}")]
    Syntax {
        /// Where the parser stopped.
        location: Location,
        /// What the parser expected.
        message: String,
    },
    /// Valid TOML that does not fit the schema: an unknown or missing key, a
    /// value of the wrong type, out of range or badly formed.
    #[error("{location}: {message}")]
    Schema {
        /// The offending key.
        location: Location,
        /// What is wrong with it.
        message: String,
    },
    /// Values that are fine one by one but contradict each other: a ring too
    /// small for the frame size, duplicate group names, two default groups,
    /// a command served by two groups, no group at all.
    #[error("{location}: {message}")]
    Invalid {
        /// The key that has to change.
        location: Location,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl Error {
    /// Where the problem is, for every kind except [`Error::Read`].
    pub fn location(&self) -> Option<&Location> {
        match self {
            Error::Read { .. } => None,
            Error::Syntax { location, .. }
            | Error::Schema { location, .. }
            | Error::Invalid { location, .. } => Some(location),
        }
    }

    /// The message without the location prefix.
    pub fn message(&self) -> String {
        match self {
            Error::Read { error, .. } => one_line(&format!("cannot read config file: {error}")),
            Error::Syntax { message, .. }
            | Error::Schema { message, .. }
            | Error::Invalid { message, .. } => message.clone(),
        }
    }
}

/// Escapes control characters (newlines included, as `\n`, `\t`,
/// `\u{1b}`) so `s` fits on one line: for any text from outside (a path,
/// a parser's message, a plugin's log line) that goes into a log line or
/// an error, which it then cannot break up or forge another of.
pub fn one_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
/// Offsets past the end or inside a multi-byte character are clamped.
pub(crate) fn line_col(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let text = "ab\ncdé\nf";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 2), (1, 3));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 5), (2, 3));
        assert_eq!(line_col(text, 6), (2, 3)); // inside 'é': clamped back
        assert_eq!(line_col(text, 7), (2, 4));
        assert_eq!(line_col(text, 8), (3, 1));
        assert_eq!(line_col(text, 1000), (3, 2));
        assert_eq!(line_col("", 5), (1, 1));
    }

    #[test]
    fn one_line_escapes() {
        assert_eq!(one_line("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(one_line("plain"), "plain");
    }
}
