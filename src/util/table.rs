//! Plain-text and markdown tables for the commands that print runs side by side.

/// A table of strings; columns whose cells are all numbers are right-aligned.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells are left empty, extra ones dropped.
    pub fn push(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Aligned columns separated by two spaces, for a terminal.
    pub fn to_text(&self) -> String {
        let widths = self.widths();
        let numeric = self.numeric_columns();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if numeric[i] {
                        format!("{cell:>w$}", w = widths[i])
                    } else {
                        format!("{cell:<w$}", w = widths[i])
                    }
                })
                .collect();
            padded.join("  ").trim_end().to_string() + "\n"
        };
        let mut out = line(&self.headers);
        for row in &self.rows {
            out += &line(row);
        }
        out
    }

    /// A GitHub-flavoured markdown table.
    pub fn to_markdown(&self) -> String {
        let numeric = self.numeric_columns();
        let line = |cells: &[String]| {
            let escaped: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
            format!("| {} |\n", escaped.join(" | "))
        };
        let mut out = line(&self.headers);
        let rule: Vec<&str> = numeric
            .iter()
            .map(|&n| if n { "---:" } else { "---" })
            .collect();
        out += &format!("|{}|\n", rule.join("|"));
        for row in &self.rows {
            out += &line(row);
        }
        out
    }

    fn widths(&self) -> Vec<usize> {
        (0..self.headers.len())
            .map(|i| {
                std::iter::once(&self.headers[i])
                    .chain(self.rows.iter().map(|r| &r[i]))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn numeric_columns(&self) -> Vec<bool> {
        (0..self.headers.len())
            .map(|i| {
                let mut cells = self.rows.iter().map(|r| r[i].as_str());
                !self.rows.is_empty() && cells.all(|c| c.is_empty() || c == "-" || looks_numeric(c))
            })
            .collect()
    }
}

fn looks_numeric(cell: &str) -> bool {
    let trimmed = cell.trim_end_matches(['%', 's', 'x']).replace(',', "");
    trimmed.parse::<f64>().is_ok()
}

/// A measured or sampled number to six significant digits, shortest form:
/// `0.11761306969782916` reads `0.117613`, `0.1` stays `0.1`.
pub fn compact(x: f64) -> String {
    let rounded: f64 = format!("{x:.5e}").parse().unwrap_or(x);
    rounded.to_string()
}

/// `0.9912` as `99.12%`; `None` as `-`.
pub fn percent(fraction: Option<f64>) -> String {
    fraction.map_or_else(|| "-".into(), |f| format!("{:.2}%", 100.0 * f))
}

/// `61706` as `61,706`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_aligns_numbers_right_and_words_left() {
        let mut table = Table::new(&["run", "acc"]);
        table.push(vec!["a".into(), "99.10%".into()]);
        table.push(vec!["longer".into(), "9.00%".into()]);
        assert_eq!(
            table.to_text(),
            "run        acc\na       99.10%\nlonger   9.00%\n"
        );
    }

    #[test]
    fn markdown_has_a_rule_and_escapes_pipes() {
        let mut table = Table::new(&["run", "params"]);
        table.push(vec!["a|b".into(), "61,706".into()]);
        assert_eq!(
            table.to_markdown(),
            "| run | params |\n|---|---:|\n| a\\|b | 61,706 |\n"
        );
    }

    #[test]
    fn formats_percent_and_thousands() {
        assert_eq!(percent(Some(0.9912)), "99.12%");
        assert_eq!(percent(None), "-");
        assert_eq!(thousands(61706), "61,706");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
