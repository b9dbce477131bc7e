//! The module graph of `src/` follows the layers listed in `docs/architecture.md`: a module
//! imports only from its own layer or lower ones, modules never import each other in a cycle,
//! and every module has a layer. Reads the source as text; unit tests are not checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One module's reference to another: where it is and how it reads.
#[derive(Debug, Clone)]
struct Import {
    from: String,
    to: String,
    at: String,
    line: String,
}

/// The layers in order, each with its modules, from the ```layers block of the architecture doc.
fn layers(doc: &str) -> Vec<(String, Vec<String>)> {
    let block = doc
        .split("```layers\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/architecture.md has a ```layers block");
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, modules) = l.split_once(':').expect("`layer: module module …`");
            (
                name.trim().to_string(),
                modules.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect()
}

/// The top-level module a file belongs to (`None` for the crate roots).
fn module_of(path: &Path) -> Option<String> {
    let mut parts = path.components().map(|c| c.as_os_str().to_string_lossy());
    let first = parts.next()?.to_string();
    if parts.next().is_none() {
        let stem = first.strip_suffix(".rs")?.to_string();
        return (stem != "lib" && stem != "main").then_some(stem);
    }
    Some(first)
}

/// Every `crate::<module>` the code of a file names (imports and inline paths), outside comments
/// and unit tests.
fn imports(from: &str, file: &str, text: &str) -> Vec<Import> {
    let mut out = Vec::new();
    let mut in_use_group = false;
    for (n, raw) in text.lines().enumerate() {
        if raw.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let line = raw.split("//").next().unwrap_or_default();
        let mut names: Vec<String> = Vec::new();
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a, b::c};`: each first segment is a module.
                let inner = group.split('}').next().unwrap_or_default();
                names.extend(inner.split(',').filter_map(|p| first_segment(p.trim())));
                in_use_group = !group.contains('}');
            } else {
                names.extend(first_segment(rest));
            }
        }
        if in_use_group && !line.contains("crate::") {
            names.extend(line.split(',').filter_map(|p| first_segment(p.trim())));
            in_use_group = !line.contains('}');
        }
        for to in names {
            if to != from {
                out.push(Import {
                    from: from.to_string(),
                    to,
                    at: format!("{file}:{}", n + 1),
                    line: raw.trim().to_string(),
                });
            }
        }
    }
    out
}

fn first_segment(path: &str) -> Option<String> {
    let name: String = path
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Every problem with the graph: upward imports, modules without a layer, cycles.
fn check(files: &[(String, String)], layers: &[(String, Vec<String>)]) -> Vec<String> {
    let layer_of: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, (_, ms))| ms.iter().map(move |m| (m.as_str(), i)))
        .collect();
    let mut problems = Vec::new();
    let mut all = Vec::new();
    let mut modules = BTreeSet::new();
    for (path, text) in files {
        let Some(module) = module_of(Path::new(path)) else {
            continue;
        };
        modules.insert(module.clone());
        all.extend(imports(&module, &format!("src/{path}"), text));
    }
    for m in &modules {
        if !layer_of.contains_key(m.as_str()) {
            problems.push(format!(
                "module `{m}` has no layer: add it to the ```layers block of docs/architecture.md"
            ));
        }
    }
    // Names that are not modules (`crate::serve`, a re-export) say nothing about layers.
    all.retain(|i| modules.contains(&i.to));
    for i in &all {
        let (Some(&from), Some(&to)) = (layer_of.get(i.from.as_str()), layer_of.get(i.to.as_str()))
        else {
            continue;
        };
        if to > from {
            problems.push(format!(
                "{}: `{}` ({}) imports `{}` of a higher layer ({}): {}",
                i.at, i.from, layers[from].0, i.to, layers[to].0, i.line
            ));
        }
    }
    problems.extend(cycles(&all));
    problems
}

/// Each cycle among modules, with the imports that close it.
fn cycles(imports: &[Import]) -> Vec<String> {
    let mut edges: BTreeMap<&str, BTreeMap<&str, &Import>> = BTreeMap::new();
    for i in imports {
        edges
            .entry(i.from.as_str())
            .or_default()
            .entry(i.to.as_str())
            .or_insert(i);
    }
    let mut found = Vec::new();
    let mut reported: BTreeSet<BTreeSet<&str>> = BTreeSet::new();
    for &start in edges.keys() {
        // Depth-first from `start`, looking for a way back to it.
        let mut stack: Vec<(&str, Vec<&Import>)> = vec![(start, Vec::new())];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for (&next, &via) in edges.get(at).into_iter().flatten() {
                let mut path = path.clone();
                path.push(via);
                if next == start {
                    let members: BTreeSet<&str> = path.iter().map(|i| i.from.as_str()).collect();
                    if reported.insert(members) {
                        let steps: Vec<String> = path
                            .iter()
                            .map(|i| format!("  {}: `{}` → `{}`: {}", i.at, i.from, i.to, i.line))
                            .collect();
                        found.push(format!("import cycle:\n{}", steps.join("\n")));
                    }
                } else if seen.insert(next) {
                    stack.push((next, path));
                }
            }
        }
    }
    found
}

fn source_files(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            source_files(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .to_string();
            out.push((rel, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

#[test]
fn modules_import_only_downward_and_never_in_a_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let layers = layers(&doc);
    let mut files = Vec::new();
    source_files(&root.join("src"), &root.join("src"), &mut files);
    assert!(files.len() > 20, "read the source tree");
    let problems = check(&files, &layers);
    assert!(
        problems.is_empty(),
        "the module graph breaks the layers of docs/architecture.md:\n{}",
        problems.join("\n")
    );
}

#[test]
fn an_upward_import_a_cycle_and_a_missing_layer_are_each_named() {
    let layers = layers("```layers\nleaves: clock\ndomain: queue store\nruntime: server\n```\n");
    let file = |p: &str, t: &str| (p.to_string(), t.to_string());
    let files = [
        file(
            "clock.rs",
            "use crate::queue::Queue; // a leaf reaching up\n",
        ),
        file("queue/mod.rs", "use crate::store::Record;\n"),
        file("store.rs", "use crate::{\n    queue::Outcome,\n};\n"),
        file(
            "server.rs",
            "use crate::queue;\n#[cfg(test)]\nmod t { use crate::server; }\n",
        ),
        file("extra.rs", "// use crate::server; in a comment only\n"),
        file("lib.rs", "pub use server::serve;\n"),
    ];
    let problems = check(&files, &layers);
    assert!(
        problems.iter().any(|p| p.starts_with(
            "src/clock.rs:1: `clock` (leaves) imports `queue` of a higher layer (domain)"
        )),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("import cycle:")
            && p.contains("`queue` → `store`")
            && p.contains("`store` → `queue`")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("module `extra` has no layer")),
        "{problems:#?}"
    );
    assert_eq!(problems.len(), 3, "nothing else: {problems:#?}");
}
