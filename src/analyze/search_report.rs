//! The report's section on searches: for each search found under the runs
//! directory, what it spent and found, its figure and its leading trials.

use std::path::{Path, PathBuf};

use crate::analyze::Result;
use crate::run::search::{self, SearchRecord};

/// How deep under the runs directory searches are looked for
/// (`runs/search-vs-grid/<config>-seed0/search/`).
const DEPTH: usize = 3;
/// Trials shown per search, best first.
const ROWS: usize = 5;

/// The section, empty where no search is found; `asset` gives a figure's path
/// and its link.
pub fn section(runs_dir: &Path, asset: &dyn Fn(&str) -> (PathBuf, String)) -> Result<String> {
    let mut markdown = String::new();
    for dir in search::find_records(runs_dir, DEPTH) {
        let Ok(record) = SearchRecord::read(&dir.join(search::RECORD_FILE)) else {
            continue;
        };
        if markdown.is_empty() {
            markdown += "## Searches\n\n";
        }
        let (path, href) = asset(&figure_name(runs_dir, &dir));
        search::figure::write(&record, &dir, &path)?;
        let shown = dir.strip_prefix(runs_dir).unwrap_or(&dir);
        markdown += &format!(
            "### {} (`{}`)\n\n{}![{} search]({href})\n\nIts leading trials:\n\n{}\n",
            record.name,
            shown.display(),
            record.overview_markdown(),
            record.name,
            record.table_top(ROWS).to_markdown()
        );
    }
    Ok(markdown)
}

/// `search-<path under the runs directory, with dashes>.png`: one file per search.
fn figure_name(runs_dir: &Path, dir: &Path) -> String {
    let relative = dir.strip_prefix(runs_dir).unwrap_or(dir);
    let slug: Vec<String> = (relative.components())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .filter(|c| !c.is_empty() && c != ".")
        .collect();
    match slug.is_empty() {
        true => "search.png".into(),
        false => format!("search-{}.png", slug.join("-")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_search_gets_its_own_figure_file() {
        let runs = Path::new("runs");
        let name = |dir: &str| figure_name(runs, Path::new(dir));
        assert_eq!(name("runs/a/b/search"), "search-a-b-search.png");
        assert_eq!(name("runs/search-x-1"), "search-search-x-1.png");
        assert_eq!(name("runs"), "search.png");
    }
}
