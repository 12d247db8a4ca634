//! The data-path crates read as ladders: no two top-level modules of a crate name
//! each other, directly or around a circle (`docs/architecture.md`). A module names
//! another when its code (not its comments) says `crate::other`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The top-level modules of the crate at `src` and, for each, the others its code
/// names.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut texts: Vec<(String, String)> = Vec::new();
    for file in sources(src) {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        let module = top.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" || module == "bin" {
            continue;
        }
        let code: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect();
        graph.entry(module.clone()).or_default();
        texts.push((module, code));
    }
    let modules: Vec<String> = graph.keys().cloned().collect();
    for (module, code) in texts {
        for other in &modules {
            if *other != module && names(&code, other) {
                graph.get_mut(&module).unwrap().insert(other.clone());
            }
        }
    }
    graph
}

/// Does `code` name module `other` (`crate::other`, not `crate::other_thing`)?
fn names(code: &str, other: &str) -> bool {
    let needle = format!("crate::{other}");
    code.match_indices(&needle).any(|(at, _)| {
        let next = code[at + needle.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// A circle in `graph`, if there is one, as the modules around it.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in &graph[node] {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn the_data_path_crates_have_no_import_circle() {
    for krate in ["engine", "replica", "iscsi-frontend", "ublk-frontend", "uring"] {
        let graph = module_graph(&crate_src(krate));
        assert!(
            graph.len() > 1 || krate.ends_with("frontend") || krate == "uring",
            "{krate}: no modules found"
        );
        if let Some(circle) = find_circle(&graph) {
            panic!(
                "{krate}: the modules {} import each other in a circle",
                circle.join(" -> ")
            );
        }
    }
}

#[test]
fn a_circle_is_found_when_there_is_one() {
    // The checker itself: a -> b -> c -> a is a circle; a -> b, a -> c is not.
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    let circle = find_circle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])).unwrap();
    assert_eq!(circle.first(), circle.last());
    assert_eq!(circle.len(), 4);
    assert!(find_circle(&graph(&[("a", "b"), ("a", "c"), ("b", "c")])).is_none());
}
