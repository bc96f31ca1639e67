//! The source tree keeps its floors (docs/architecture.md): no import cycles between the
//! top-level modules, and nothing in the library imports the operator tools, the server or the
//! branch agent (only the binaries and the `portcullis` binary's `commands` do).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, but `src/bin`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.ends_with("bin") {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module -> the top-level modules its non-test code names as `crate::x`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.iter().next().unwrap().to_str().unwrap();
        let module = first.trim_end_matches(".rs").to_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name != module && !name.is_empty() {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn modules_import_no_cycle_and_nothing_imports_the_top_floor() {
    let graph = imports();
    assert!(
        graph.contains_key("gateway") && graph.contains_key("policy"),
        "{graph:?}"
    );
    // Depth-first search for a path back to the start.
    fn back_to(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if !path.contains(next) {
                path.push(next.clone());
                if back_to(graph, start, next, path) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    for module in graph.keys() {
        let mut path = vec![module.clone()];
        assert!(
            !back_to(&graph, module, module, &mut path),
            "import cycle: {}",
            path.join(" -> ")
        );
    }
    for (module, deps) in &graph {
        for top in ["cli", "server", "agent", "commands"] {
            assert!(
                !deps.contains(top) || module == "lib" || (module == "commands" && top != module),
                "{module} imports {top}: operator tools, the server and the agent are the top floor (only the binary's commands use them)"
            );
        }
    }
    for (module, deps) in &graph {
        if deps.contains("control") || deps.contains("admin") {
            assert!(
                ["server", "admin", "commands"].contains(&module.as_str()),
                "{module} imports the server's parts"
            );
        }
    }
}
