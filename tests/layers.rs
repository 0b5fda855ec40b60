//! The layers of `src/` import only downward: each folder may use its own modules
//! and those of the folders below it, never one above. Read from the `use` lines
//! and `crate::` paths of every source file, so the rule stays true as code moves.

use std::path::Path;

/// Lowest first. `main.rs` and `lib.rs` sit above everything.
const LAYERS: [&str; 9] = [
    "util", "data", "kernels", "model", "train", "config", "run", "analyze", "cli",
];

fn layer_of(name: &str) -> Option<usize> {
    LAYERS.iter().position(|&layer| layer == name)
}

/// Every `.rs` file under `dir`, with the layer its top-level folder names.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules (layers) that `text`, the source of the module at
/// `module` (`["run", "sweep", "record"]` for `src/run/sweep/record.rs`), refers
/// to: through `crate::NAME`, grouped imports (`crate::{a::X, b}`), `super::`
/// chains that climb to the crate root (counting inline `mod NAME { ... }`
/// blocks), and globs; `*` stands for a glob of the crate root itself.
fn layer_references(text: &str, module: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (start, _) in text.match_indices("crate::") {
        // `mnist_lab::`-style paths do not occur inside the library; skip `$crate`.
        if text[..start].ends_with('$') {
            continue;
        }
        found.extend(root_items(&text[start + "crate::".len()..]));
    }
    let bytes = text.as_bytes();
    for (start, _) in text.match_indices("super::") {
        // Only the first `super::` of a chain.
        if text[..start].ends_with("::")
            || bytes
                .get(start.wrapping_sub(1))
                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        {
            continue;
        }
        let mut rest = &text[start..];
        let mut ups = 0;
        while let Some(after) = rest.strip_prefix("super::") {
            ups += 1;
            rest = after;
        }
        let depth = module.len() + inline_modules_open(&text[..start]);
        if ups >= depth {
            found.extend(root_items(rest));
        }
    }
    found
}

/// The first segment of a path from the crate root, or of each item of a
/// `{...}` group; `*` for a glob.
fn root_items(path: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        let s = s.trim_start();
        if s.starts_with('*') {
            return "*".into();
        }
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = path.strip_prefix('{') else {
        return vec![ident(path)]
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect();
    };
    // Split the group at its own top-level commas.
    let (mut items, mut depth, mut item_start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[item_start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[item_start..i]);
                item_start = i + 1;
            }
            _ => {}
        }
    }
    items
        .into_iter()
        .map(ident)
        .filter(|n| !n.is_empty() && n != "self")
        .collect()
}

/// How many inline `mod NAME {` blocks are open at the end of `before`.
fn inline_modules_open(before: &str) -> usize {
    let mut open: Vec<usize> = Vec::new(); // brace depth at which each opened
    let mut depth = 0usize;
    let mut pending_mod = false;
    let words = before.split_inclusive(|c: char| c == '{' || c == '}' || c.is_whitespace());
    let mut previous = "";
    for word in words {
        let token = word.trim_end_matches(|c: char| c == '{' || c == '}' || c.is_whitespace());
        if previous == "mod" && !token.is_empty() {
            pending_mod = true;
        }
        if !token.is_empty() {
            previous = token;
        }
        if word.ends_with('{') {
            depth += 1;
            if pending_mod {
                open.push(depth);
            }
            pending_mod = false;
        } else if word.ends_with('}') {
            if open.last() == Some(&depth) {
                open.pop();
            }
            depth = depth.saturating_sub(1);
        } else if word.ends_with(';') || token.ends_with(';') {
            pending_mod = false;
        }
    }
    open.len()
}

/// The module path of a source file under `src/`: its folders and stem
/// (`mod.rs` and `lib.rs`/`main.rs` add nothing).
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap_or_default();
    let stem = file.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.iter().next().unwrap().to_string_lossy();
        let Some(own) = layer_of(&top) else {
            assert!(
                top == "main.rs" || top == "lib.rs",
                "{} is outside the layers {LAYERS:?}",
                relative.display()
            );
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        let module = module_path(relative);
        let module: Vec<&str> = module.iter().map(String::as_str).collect();
        violations.extend(violations_in(
            &text,
            &module,
            own,
            &relative.display().to_string(),
        ));
    }
    assert!(
        violations.is_empty(),
        "imports from a higher layer:\n{}",
        violations.join("\n")
    );
}

/// What `text` (the module at `module`, in layer `own`) imports from above
/// its layer, or from the whole crate root at once.
fn violations_in(text: &str, module: &[&str], own: usize, file: &str) -> Vec<String> {
    let mut violations = Vec::new();
    for name in layer_references(text, module) {
        if name == "*" {
            violations.push(format!("{file} imports the crate root with a glob"));
            continue;
        }
        let layer = layer_of(&name).unwrap_or_else(|| panic!("{file}: crate::{name} is no layer"));
        if layer > own {
            violations.push(format!("{file} uses crate::{name}"));
        }
    }
    violations
}

#[test]
fn the_source_root_holds_only_the_entry_points_and_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let allowed = if path.is_dir() {
            layer_of(&name).is_some()
        } else {
            name == "main.rs" || name == "lib.rs"
        };
        assert!(allowed, "src/{name} does not belong at the top of src/");
    }
}

#[test]
fn the_checker_sees_references() {
    let refs = layer_references(
        "use crate::run::rundir;\nlet x = crate::util::fsio::read_text(p);",
        &["analyze", "x"],
    );
    assert_eq!(refs, vec!["run", "util"]);
}

/// Each way of naming a higher layer from `run/x.rs` is caught.
#[test]
fn the_checker_catches_every_import_form() {
    let run = layer_of("run").unwrap();
    let caught = |text: &str| !violations_in(text, &["run", "x"], run, "run/x.rs").is_empty();
    for upward in [
        "use crate::cli::UsageError;",
        "use crate::{util::fsio, cli::UsageError};",
        "use crate::{\n    util::{fsio, table},\n    analyze::report,\n};",
        "use super::super::cli::UsageError;",
        "mod tests {\n    use super::super::super::cli::X;\n}",
        "use super::super::{util, cli};",
        "use crate::cli::*;",
        "use crate::{util, cli::*};",
        "use crate::*;",
        "use super::super::*;",
    ] {
        assert!(caught(upward), "missed: {upward}");
    }
    for within in [
        "use crate::{util::fsio, data::Split, run::metrics};",
        "use super::metrics;",
        "mod tests {\n    use super::*;\n    use super::super::metrics;\n}",
        "use crate::util::*;",
    ] {
        assert!(!caught(within), "flagged: {within}");
    }
}

/// A file a newcomer can read: at most this many lines, outside the kernels
/// (whose SIMD loops and their tests read better whole).
const MAX_FILE_LINES: usize = 450;

#[test]
fn no_file_outside_the_kernels_is_over_450_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    sources(&root.join("tests"), &mut files);
    let kernels = root.join("src").join("kernels");
    let long: Vec<String> = files
        .iter()
        .filter(|file| !file.starts_with(&kernels))
        .filter_map(|file| {
            let lines = std::fs::read_to_string(file).unwrap().lines().count();
            let relative = file.strip_prefix(root).unwrap().display();
            (lines > MAX_FILE_LINES).then(|| format!("{relative}: {lines} lines"))
        })
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_FILE_LINES} lines:\n{}",
        long.join("\n")
    );
}
