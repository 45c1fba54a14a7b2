//! JSON lines: one object per line, `"kind"` names the record. Readers report
//! the source and line number of every error and ignore unknown fields.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{BufRead, Write};

/// Streaming JSON-lines reader. Blank lines are skipped; memory is one line.
pub struct Reader<R> {
    src: String,
    inner: R,
    line: String,
    line_no: u64,
}

impl<R: BufRead> Reader<R> {
    pub fn new(src: impl Into<String>, inner: R) -> Self {
        Reader {
            src: src.into(),
            inner,
            line: String::new(),
            line_no: 0,
        }
    }

    /// The name of the source, for messages.
    pub fn source(&self) -> &str {
        &self.src
    }

    /// Line number of the record last returned (1-based).
    pub fn line_no(&self) -> u64 {
        self.line_no
    }

    /// `"<source>: line N"`, for error messages about the last record.
    pub fn here(&self) -> String {
        format!("{}: line {}", self.src, self.line_no)
    }

    /// The next non-blank line, raw. `None` at end of input.
    pub fn next_line(&mut self) -> Result<Option<&str>> {
        loop {
            self.line.clear();
            let n = self
                .inner
                .read_line(&mut self.line)
                .map_err(|e| Error::io("reading", &self.src, e))?;
            if n == 0 {
                return Ok(None);
            }
            self.line_no += 1;
            if !self.line.trim().is_empty() {
                return Ok(Some(self.line.trim_end()));
            }
        }
    }

    /// The line [`Reader::next_line`] returned last, again (trimmed).
    pub fn current_line(&self) -> &str {
        self.line.trim_end()
    }

    /// The next record decoded as `T`, or `None` at end of input.
    pub fn next_record<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        let Some(line) = self.next_line()? else {
            return Ok(None);
        };
        let parsed = serde_json::from_str::<T>(line);
        parsed.map(Some).map_err(|e| self.decode_error(&e))
    }

    /// The next record decoded with a serde seed (for decoders that keep
    /// state across records, e.g. counting into a buffer), or `None` at end.
    pub fn next_record_seed<S, V>(&mut self, seed: S) -> Result<Option<V>>
    where
        S: for<'de> serde::de::DeserializeSeed<'de, Value = V>,
    {
        let Some(line) = self.next_line()? else {
            return Ok(None);
        };
        let mut de = serde_json::Deserializer::from_str(line);
        let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|_| v));
        parsed.map(Some).map_err(|e| self.decode_error(&e))
    }

    /// Turn a serde_json error on the current line into an input error naming
    /// the source, line and column.
    pub fn decode_error(&self, e: &serde_json::Error) -> Error {
        let msg = e.to_string();
        // serde_json appends " at line 1 column N"; the line is ours to tell.
        let msg = match msg.rfind(" at line ") {
            Some(i) => {
                let col = e.column();
                format!("{} (column {col})", &msg[..i])
            }
            None => msg,
        };
        if e.is_syntax() || e.is_eof() {
            Error::input(format!(
                "{}: malformed JSON: {msg}; each line must be one JSON object",
                self.here()
            ))
        } else {
            Error::input(format!("{}: {msg}", self.here()))
        }
    }
}

/// Write one record as a compact JSON line.
pub fn write_record<W: Write + ?Sized, T: Serialize>(w: &mut W, rec: &T) -> Result<()> {
    serde_json::to_writer(&mut *w, rec).map_err(|e| match e.io_error_kind() {
        Some(kind) => Error::stdout(std::io::Error::from(kind)),
        None => Error::input(format!("cannot encode record: {e}")),
    })?;
    w.write_all(b"\n").map_err(Error::stdout)
}

/// Only the `kind` of a record, to dispatch before decoding the rest.
#[derive(serde::Deserialize)]
pub struct KindOnly {
    #[serde(default)]
    pub kind: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct R {
        a: u32,
    }

    #[test]
    fn reports_line_numbers_and_skips_blank_lines() {
        let data = "{\"a\":1}\n\n{\"a\":2, \"extra\":true}\n{\"a\":\n";
        let mut r = Reader::new("t.jsonl", data.as_bytes());
        assert_eq!(r.next_record::<R>().unwrap().unwrap().a, 1);
        assert_eq!(r.next_record::<R>().unwrap().unwrap().a, 2);
        assert_eq!(r.line_no(), 3);
        let e = r.next_record::<R>().unwrap_err().to_string();
        assert!(e.contains("t.jsonl: line 4"), "{e}");
        assert!(e.contains("malformed JSON"), "{e}");
        assert!(r.next_record::<R>().unwrap().is_none());
    }

    #[test]
    fn missing_field_is_named() {
        let mut r = Reader::new("x", "{\"b\":1}".as_bytes());
        let e = r.next_record::<R>().unwrap_err().to_string();
        assert!(
            e.contains("missing field `a`") && e.contains("line 1"),
            "{e}"
        );
    }
}
