//! Plain-text tables for the operator subcommands: left-aligned columns two
//! spaces apart, widths from the widest cell, no trailing spaces. Cells are
//! one line each (newlines and tabs become spaces), so a receiver's message
//! cannot break the layout.

use std::fmt;
use std::time::SystemTime;

/// Rows of cells under a header.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one cell per column.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows
            .push(cells.into_iter().map(|c| one_line(&c)).collect());
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = width - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// Control characters (newlines, tabs, …) as spaces.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A timestamp for a table: UTC to the second, `2026-11-27T17:00:31Z`.
pub fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A timestamp for JSON output and detail views: UTC with microseconds,
/// PostgreSQL's precision.
pub fn precise_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// An optional value, `-` when absent.
pub fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_and_cells_kept_on_one_line() {
        let mut table = Table::new(&["id", "message"]);
        table.row(vec!["1".into(), "two\nlines".into()]);
        table.row(vec!["100".into(), String::new()]);
        assert_eq!(
            table.to_string(),
            "id   message\n1    two lines\n100\n",
            "padded to the widest cell, no trailing spaces"
        );
    }

    #[test]
    fn times_are_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_500_000);
        assert_eq!(time(t), "1970-01-01T00:00:01Z");
        assert_eq!(precise_time(t), "1970-01-01T00:00:01.500000Z");
    }
}
