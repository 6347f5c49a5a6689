//! No module of any workspace crate depends, directly or through others, on a module that
//! depends back on it: the modules of each crate (and the files of each folder module) form
//! a DAG. A dependency is a `crate::m` / `super::m` path in code (comments and the
//! `#[cfg(test)]` tail of a file are not code); crate roots (`lib.rs`, `main.rs`) and folder
//! roots (`mod.rs`) only re-export, so they are not nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The `src/` folders of the workspace's crates.
const CRATES: &[&str] = &["core", "backends/cpu", "backends/cubecl", "backends/conformance", "trainer", "cli"];

/// The module a source file belongs to at one level of a folder: its stem, or its first
/// folder below `root`.
fn module_of(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "mod")).then(|| name.to_string())
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The code of a file: no comments, nothing from `#[cfg(test)]` on.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Every identifier that follows `prefix` in `code` (also inside `prefix{a, b}` groups).
fn after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        let rest = &code[i + prefix.len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group.split('}').next().unwrap_or("").split(',').collect(),
            None => vec![rest],
        };
        for n in names {
            let ident: String = n.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !ident.is_empty() {
                out.insert(ident);
            }
        }
    }
    out
}

/// Edges between the modules of the folder `dir` (a crate's `src/` or a folder module),
/// where paths to those modules start with `crate_path` (`crate::` or `crate::m::`) or, for
/// siblings inside a folder, `super::`.
fn graph(dir: &Path, crate_path: &str, siblings_via_super: bool) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let files = rust_files(dir);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(dir, f)).collect();
    for file in &files {
        let Some(from) = module_of(dir, file) else { continue };
        let code = code(file);
        let mut targets = after(&code, crate_path);
        let direct_child = file.parent() == Some(dir);
        if siblings_via_super && direct_child {
            targets.extend(after(&code, "super::"));
        }
        let entry = edges.entry(from.clone()).or_default();
        entry.extend(targets.into_iter().filter(|t| *t != from && modules.contains(t)));
    }
    edges
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, edges, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn modules_of_every_crate_form_a_dag() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for krate in CRATES {
        let src = root.join(krate).join("src");
        let mut folders = vec![(src.clone(), "crate::".to_string(), false)];
        for entry in std::fs::read_dir(&src).unwrap().flatten() {
            if entry.path().is_dir() {
                let name = entry.file_name().into_string().unwrap();
                folders.push((entry.path(), format!("crate::{name}::"), true));
            }
        }
        for (dir, path, via_super) in folders {
            let edges = graph(&dir, &path, via_super);
            checked += edges.len();
            if let Some(cycle) = find_cycle(&edges) {
                panic!("module cycle in {}: {}", dir.display(), cycle.join(" -> "));
            }
        }
    }
    assert!(checked > 50, "only {checked} modules found: is the workspace layout what this test expects?");
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let edges: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(find_cycle(&edges), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    assert_eq!(after("use crate::{model, run::X};", "crate::"), BTreeSet::from(["model".into(), "run".into()]));
}

/// Every module `from` reaches through `edges`, itself included.
fn reachable(edges: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let (mut seen, mut todo) = (BTreeSet::new(), vec![from.to_string()]);
    while let Some(n) = todo.pop() {
        if seen.insert(n.clone()) {
            todo.extend(edges.get(&n).into_iter().flatten().cloned());
        }
    }
    seen
}

/// Training (the step, the objective, the training run, the run stream) never depends on the
/// research instruments: they measure a model and may change without touching training.
#[test]
fn training_does_not_depend_on_the_analysis_module() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = graph(&src, "crate::", false);
    assert!(edges.contains_key("analysis") && edges.contains_key("validation"), "the modules this test is about");
    for training in ["train", "objective", "session", "run", "optim", "model"] {
        let reached = reachable(&edges, training);
        assert!(!reached.contains("analysis"), "{training} reaches analysis: {reached:?}");
    }
    // The toy validation is what reads the instruments.
    assert!(reachable(&edges, "validation").contains("analysis"));
}
