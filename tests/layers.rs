//! The layers of `src/` import only downward: each folder may use its own modules
//! and those of the folders below it, never one above. Read from the `use` lines
//! and `crate::` paths of every source file, so the rule stays true as code moves.

use std::path::Path;

/// Lowest first. `main.rs` and `lib.rs` sit above everything.
const LAYERS: [&str; 8] = [
    "util", "data", "model", "train", "config", "run", "analyze", "cli",
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

/// The top-level modules `text` refers to through `crate::NAME`.
fn crate_references(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (start, _) in text.match_indices("crate::") {
        // `mnist_lab::`-style paths do not occur inside the library; skip `$crate`.
        if text[..start].ends_with('$') {
            continue;
        }
        let rest = &text[start + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.push(name);
        }
    }
    found
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
        for name in crate_references(&text) {
            let layer = layer_of(&name)
                .unwrap_or_else(|| panic!("{}: crate::{name} is no layer", relative.display()));
            if layer > own {
                violations.push(format!("{} uses crate::{name}", relative.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports from a higher layer:\n{}",
        violations.join("\n")
    );
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
    let refs =
        crate_references("use crate::run::rundir;\nlet x = crate::util::fsio::read_text(p);");
    assert_eq!(refs, vec!["run", "util"]);
}
