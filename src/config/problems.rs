//! Config problems: where each one is (file, line, column, dotted key) and what was expected.
//! Compilation collects them all, so an operator fixes a file in one pass.

use std::fmt;
use std::ops::Range;

/// Everything wrong with one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

/// One problem (or, in [`Config::warnings`](super::Config::warnings), one warning): where it
/// is and what was expected.
#[derive(Clone, Debug)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, as in `policy.allow[1].hosts[0]`; empty when the parser could not tell.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: a problem with the file as a whole (it cannot be read), not a place in it.
        if self.line == 0 {
            write!(f, "{}: ", self.file)?;
        } else {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            problem.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects problems (and warnings: valid, but surely not what was meant) with their
/// positions in one file.
pub(super) struct Problems<'a> {
    pub(super) file: &'a str,
    pub(super) source: &'a str,
    pub(super) list: Vec<Problem>,
    pub(super) warnings: Vec<Problem>,
}

impl Problems<'_> {
    pub(super) fn add(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let problem = self.at(span, key.into(), message.into());
        self.list.push(problem);
    }

    /// A warning: the file is valid, the gateway runs, but this part can never take effect.
    pub(super) fn warn(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let problem = self.at(span, key.into(), message.into());
        self.warnings.push(problem);
    }

    fn at(&self, span: Range<usize>, key: String, message: String) -> Problem {
        let (line, column) = line_column(self.source, span.start);
        Problem {
            file: self.file.to_owned(),
            line,
            column,
            key,
            message,
        }
    }
}

/// 1-based line and column of byte `offset` in `source`.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let before = &source.as_bytes()[..offset.min(source.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    (line, offset.min(source.len()) - line_start + 1)
}
