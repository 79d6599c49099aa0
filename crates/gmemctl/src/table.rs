//! A minimal left-aligned text table for human output.

/// Rows of cells, printed with columns padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with a header row.
    pub fn new<S: ToString>(header: impl IntoIterator<Item = S>) -> Self {
        let mut table = Table::default();
        table.row(header);
        table
    }

    /// Appends a row.
    pub fn row<S: ToString>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows
            .push(cells.into_iter().map(|c| c.to_string()).collect());
    }

    /// Renders the table, two spaces between columns, no trailing spaces. The last cell of
    /// a row shorter than the rest (a sentence, such as why a row was skipped) runs on over
    /// the columns it leaves out and widens none.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let spills = |r: &Vec<String>, c: usize| r.len() < columns && c + 1 == r.len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter(|r| !spills(r, c))
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    let width = if spills(row, c) { 0 } else { widths[c] };
                    format!("{cell:<width$}")
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns() {
        let mut t = Table::new(["a", "bbb"]);
        t.row(["cccc", "d"]);
        assert_eq!(t.render(), "a     bbb\ncccc  d\n");
        assert_eq!(mib(3 << 20), "3.0 MiB");
    }

    #[test]
    fn a_short_row_spills_over_and_widens_nothing() {
        let mut t = Table::new(["name", "GB/s", "x memcpy"]);
        t.row(["remap", "0.76", "0.09"]);
        t.row(["native", "SKIP: a long reason"]);
        assert_eq!(
            t.render(),
            "name    GB/s  x memcpy\nremap   0.76  0.09\nnative  SKIP: a long reason\n"
        );
    }
}
