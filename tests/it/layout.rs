//! The source tree keeps its floors (docs/architecture.md): no import cycles between the
//! top-level modules, and nothing in the library imports the operator tools, the server or the
//! branch agent (only the binaries and the `portcullis` binary's `commands` do).
//!
//! Every file is read whole: each `use` (nested groups, `pub use`, uses inside functions) and
//! each `crate::`/`super::` path written in code, resolved to the crate path it names. Comments,
//! string literals and test code (`#[cfg(test)]` items and the files of `#[cfg(test)] mod x;`)
//! are left out.

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

/// The module path of a file under `src/` (`gateway/connect.rs` is `gateway::connect`,
/// `config/mod.rs` is `config`, `lib.rs` the crate root).
fn module_of(relative: &Path) -> Vec<String> {
    let mut path: Vec<String> = relative
        .iter()
        .map(|part| part.to_str().unwrap().trim_end_matches(".rs").to_owned())
        .collect();
    if matches!(path.last().map(String::as_str), Some("mod" | "lib")) {
        path.pop();
    }
    path
}

/// `text` with comments, string and character literals blanked, so only code is left.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && (i == 0 || !is_ident(chars[i - 1]) || chars[i - 1] == 'b')
        {
            // A raw string: r"..." or r#"..."#, as many # at the end as at the start.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                // r#ident, a raw identifier.
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            while j < chars.len() {
                if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && next == Some('\\') {
            // An escaped character literal: '\n', '\'', '\u{..}'.
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            i += 3;
            out.push_str("' '");
        } else {
            // Code, and lifetimes ('a) as they are.
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Identifiers (`$crate` as one), `::`, and every other character as a token of its own.
fn tokens(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' || (c == '$' && chars.get(i + 1) == Some(&'c')) {
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(chars[start..i].iter().collect::<String>().replace('$', ""));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

fn is_ident(token: &str) -> bool {
    token
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// What one file names: paths (each with the module it is written in) and the modules it
/// declares, test code left out.
#[derive(Default)]
struct Names {
    /// (module the path is written in, the path as written).
    paths: Vec<(Vec<String>, Vec<String>)>,
    /// Modules declared with `mod x` (full paths).
    modules: BTreeSet<Vec<String>>,
    /// Modules declared `#[cfg(test)] mod x;`: their files are test code.
    test_modules: BTreeSet<Vec<String>>,
}

/// The paths of a `use` tree starting at `tokens[*i]`, each appended to `prefix`.
fn use_tree(tokens: &[String], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    while *i < tokens.len() {
        let token = tokens[*i].as_str();
        match token {
            "{" => {
                *i += 1;
                while *i < tokens.len() && tokens[*i] != "}" {
                    use_tree(tokens, i, path.clone(), out);
                    if tokens.get(*i).map(String::as_str) == Some(",") {
                        *i += 1;
                    }
                }
                *i += 1;
                return;
            }
            "*" => {
                *i += 1;
                out.push(path);
                return;
            }
            "::" => {
                if path.is_empty() {
                    // `::name`: an external crate.
                    path.push("::".into());
                }
                *i += 1;
            }
            _ if is_ident(token) => {
                if token != "self" || path.is_empty() {
                    path.push(token.to_owned());
                }
                *i += 1;
                if tokens.get(*i).map(String::as_str) == Some("as") {
                    *i += 2;
                }
                if tokens.get(*i).map(String::as_str) != Some("::") {
                    out.push(path);
                    return;
                }
            }
            _ => {
                // `,`, `}` or `;`: the end of this tree.
                out.push(path);
                return;
            }
        }
    }
}

/// The index after the item starting at `tokens[i]` (its attributes already passed): at its
/// `;`, or at the `}` that closes its body.
fn item_end(tokens: &[String], mut i: usize) -> usize {
    let first = tokens[i..]
        .iter()
        .find(|t| !matches!(t.as_str(), "pub" | "(" | ")" | "crate" | "super" | "in"))
        .map(String::as_str);
    let ends_at_semicolon = matches!(first, Some("use" | "const" | "static" | "type"));
    let mut depth = 0usize;
    while i < tokens.len() {
        match tokens[i].as_str() {
            "{" | "(" | "[" => depth += 1,
            "}" | ")" | "]" => {
                depth -= 1;
                if depth == 0 && tokens[i] == "}" && !ends_at_semicolon {
                    return i + 1;
                }
            }
            ";" if depth == 0 => return i + 1,
            _ => {}
        }
        i += 1;
    }
    i
}

/// The index after the attribute `#[...]` starting at `tokens[i]`.
fn attribute_end(tokens: &[String], mut i: usize) -> usize {
    let mut depth = 0;
    i += 1;
    while i < tokens.len() {
        match tokens[i].as_str() {
            "[" => depth += 1,
            "]" => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// Reads the code of the file whose module is `module`.
fn names_in(code: &str, module: &[String]) -> Names {
    let tokens = tokens(code);
    let mut names = Names::default();
    // Inline modules open here: (their path, the brace depth inside them).
    let mut scopes: Vec<(Vec<String>, usize)> = vec![(module.to_vec(), 0)];
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        let here = scopes.last().unwrap().0.clone();
        let token = tokens[i].as_str();
        let next = tokens.get(i + 1).map(String::as_str);
        if token == "#"
            && tokens[i..].starts_with(&["#", "[", "cfg", "(", "test", ")", "]"].map(String::from))
        {
            // Test code: skip the item (and any further attributes on it).
            let mut j = i + 7;
            while tokens.get(j).map(String::as_str) == Some("#") {
                j = attribute_end(&tokens, j);
            }
            let mut k = j;
            while matches!(
                tokens.get(k).map(String::as_str),
                Some("pub" | "(" | ")" | "crate")
            ) {
                k += 1;
            }
            if tokens.get(k).map(String::as_str) == Some("mod")
                && tokens.get(k + 2).map(String::as_str) == Some(";")
            {
                let mut path = here.clone();
                path.push(tokens[k + 1].clone());
                names.test_modules.insert(path);
            }
            i = item_end(&tokens, j);
            continue;
        }
        match token {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if scopes.len() > 1 && scopes.last().unwrap().1 == depth + 1 {
                    scopes.pop();
                }
            }
            "mod" if next.is_some_and(is_ident) => {
                let mut path = here.clone();
                path.push(tokens[i + 1].clone());
                names.modules.insert(path.clone());
                if tokens.get(i + 2).map(String::as_str) == Some("{") {
                    depth += 1;
                    scopes.push((path, depth));
                    i += 3;
                    continue;
                }
            }
            "use" => {
                i += 1;
                let mut paths = Vec::new();
                use_tree(&tokens, &mut i, Vec::new(), &mut paths);
                names
                    .paths
                    .extend(paths.into_iter().map(|p| (here.clone(), p)));
                continue;
            }
            "crate" | "super" if next == Some("::") && (i == 0 || tokens[i - 1] != "::") => {
                // A path written in code: `crate::a::b`, `super::super::c`.
                let mut path = vec![token.to_owned()];
                let mut j = i + 1;
                while tokens.get(j).map(String::as_str) == Some("::")
                    && tokens.get(j + 1).is_some_and(|t| is_ident(t))
                {
                    path.push(tokens[j + 1].clone());
                    j += 2;
                }
                names.paths.push((here.clone(), path));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// `path` as written in module `module`, as a path from the crate root; `None` for another
/// crate's (std, tokio, ...) or an item of the module itself.
fn resolve(
    module: &[String],
    path: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let first = path.first()?.as_str();
    match first {
        "crate" => Some(path[1..].to_vec()),
        "super" | "self" => {
            let mut base = module.to_vec();
            let mut rest = path;
            while let Some(step) = rest.first() {
                match step.as_str() {
                    "super" => {
                        base.pop().expect("super above the crate root");
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }
        _ => {
            // `child::x` names a module declared here; anything else is another crate's.
            let mut child = module.to_vec();
            child.push(first.to_owned());
            modules.contains(&child).then(|| {
                child.extend(path[1..].iter().cloned());
                child
            })
        }
    }
}

/// Top-level module -> the top-level modules its non-test code names, every `use` and every
/// `crate::`/`super::` path included.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut read = Vec::new();
    let mut modules = BTreeSet::new();
    let mut test_modules = BTreeSet::new();
    for file in files {
        let module = module_of(file.strip_prefix(&src).unwrap());
        let text = std::fs::read_to_string(&file).unwrap();
        let names = names_in(&code_only(&text), &module);
        modules.extend(names.modules.iter().cloned());
        test_modules.extend(names.test_modules.iter().cloned());
        read.push((module, names));
    }
    let tops: BTreeSet<String> = modules
        .iter()
        .filter(|m| m.len() == 1)
        .map(|m| m[0].clone())
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, names) in read {
        if test_modules.iter().any(|t| module.starts_with(t)) {
            continue;
        }
        let top = module.first().cloned().unwrap_or_else(|| "lib".to_owned());
        let deps = graph.entry(top.clone()).or_default();
        for (written_in, path) in &names.paths {
            let Some(resolved) = resolve(written_in, path, &modules) else {
                continue;
            };
            let target = match resolved.first() {
                None => continue,
                Some(first) if tops.contains(first) => first.clone(),
                // An item of the crate root.
                Some(_) => "lib".to_owned(),
            };
            if target != top {
                deps.insert(target);
            }
        }
    }
    graph
}

/// What the reader finds in a file written for it: nested groups, `pub use`, uses after the
/// first item and inside functions, `super` paths, inline paths; nothing from comments,
/// strings or test code.
#[test]
fn the_reader_sees_every_use_and_no_test_code() {
    let text = r##"
//! use crate::commented;
#[cfg(test)]
mod tests;
mod child;
pub use crate::{alpha::A, beta::{self, gamma::{C, D as E}}};
pub(crate) use super::delta::F;
use child::G;
use std::io;
fn f() {
    use crate::epsilon::*;
    let s = "crate::in_a_string";
    let r = r#"use crate::raw"#;
    let c = '"';
    crate::zeta::call(super::super::eta());
}
#[cfg(test)]
fn helper() { crate::test_only::x(); }
#[cfg(test)]
use crate::test_use::Y;
mod inline { use super::super::theta::H; }
use crate::iota::I;
"##;
    let module = ["top".to_owned(), "file".to_owned()];
    let names = names_in(&code_only(text), &module);
    let mut modules = names.modules.clone();
    modules.insert(vec!["top".into(), "file".into(), "child".into()]);
    let resolved: BTreeSet<String> = names
        .paths
        .iter()
        .filter_map(|(here, path)| resolve(here, path, &modules))
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = [
        "alpha::A",
        "beta",
        "beta::gamma::C",
        "beta::gamma::D",
        "top::delta::F",
        "top::file::child::G",
        "epsilon",
        "zeta::call",
        "eta",
        "top::theta::H",
        "iota::I",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(resolved, want);
    assert_eq!(
        names.test_modules,
        BTreeSet::from([vec!["top".into(), "file".into(), "tests".into()]])
    );
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
