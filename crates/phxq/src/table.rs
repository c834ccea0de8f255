//! Plain-text tables for human output: columns padded to their widest cell.

/// How a column's cells line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    /// For numbers, so that digits line up.
    Right,
}

/// Renders `rows` under `columns` (name, alignment), two spaces between columns, one line per
/// row, each ending in a newline. Every row must have one cell per column.
pub fn render(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns
        .iter()
        .map(|(name, _)| name.chars().count())
        .collect();
    for row in rows {
        assert_eq!(
            row.len(),
            columns.len(),
            "a table row has one cell per column"
        );
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(name, _)| name.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(columns)
            .zip(&widths)
            .map(|((cell, (_, align)), &width)| match align {
                Align::Left => format!("{cell:<width$}"),
                Align::Right => format!("{cell:>width$}"),
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rendered = render(
            &[("name", Align::Left), ("n", Align::Right)],
            &[
                vec!["a".into(), "1".into()],
                vec!["bbbbbb".into(), "100".into()],
            ],
        );
        assert_eq!(rendered, "name      n\na         1\nbbbbbb  100\n");
    }
}
