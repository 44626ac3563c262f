//! The module graph of the agent crate keeps its layers: every `crate::`
//! path in `agent/src` (library and binary) points to the same layer or one
//! below it, and no file reaches itself through such paths (no import loop).
//! The layer order is the one docs/architecture.md describes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, bottom to top. Modules on the same rank may use each
/// other (never in a loop); a module may never use one of a higher rank.
const LAYERS: &[(&str, u8)] = &[
    ("error", 0),
    ("util", 0),
    ("pool", 0),
    ("process_metrics", 0),
    ("crypto", 1),
    ("conn_limits", 1),
    ("identity", 2),
    ("config", 2),
    ("cdc", 1),
    ("chunk", 2),
    ("record", 3),
    ("ticket", 4),
    ("declare", 4),
    ("manifest", 4),
    ("store", 5),
    ("wire", 6),
    ("trust", 7),
    ("repository", 8),
    ("node", 9),
    ("daemon", 10),
    ("cli", 11),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`None`: the crate roots).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

fn rank(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, r)| *r)
        .unwrap_or_else(|| panic!("module `{module}` is not in the layer list of tests/layers.rs"))
}

/// Every `crate::a::b::…` path in a file's code (comments left out), with
/// `use crate::{a, b::c}` groups expanded one level.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `caravan_agent::`, not `crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let path = segments(item.trim());
                if !path.is_empty() {
                    out.push(path);
                }
            }
        } else {
            out.push(segments(rest));
        }
    }
    out
}

fn segments(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        out.push(rest[..end].to_string());
        match rest[end..].strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    out
}

/// The file a path resolves to: the longest prefix that is a module file.
fn resolve(src: &Path, path: &[String]) -> Option<PathBuf> {
    for n in (1..=path.len()).rev() {
        let base: PathBuf = path[..n].iter().collect();
        for cand in [base.with_extension("rs"), base.join("mod.rs")] {
            if src.join(&cand).is_file() {
                return Some(cand);
            }
        }
    }
    None
}

fn graph() -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let src = src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_path_buf();
        let text = std::fs::read_to_string(&f).unwrap();
        let mut to = BTreeSet::new();
        for p in crate_paths(&text) {
            if let Some(t) = resolve(&src, &p)
                && t != rel
            {
                to.insert(t);
            }
        }
        g.insert(rel, to);
    }
    g
}

#[test]
fn no_import_goes_up_a_layer() {
    let mut upward = Vec::new();
    for (from, tos) in graph() {
        let Some(fm) = module_of(&from) else { continue };
        for to in tos {
            let Some(tm) = module_of(&to) else { continue };
            if rank(&tm) > rank(&fm) {
                upward.push(format!("{} -> {}", from.display(), to.display()));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports going up a layer:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_import_loops() {
    let g = graph();
    // Depth-first search with colours; report the first loop found.
    fn visit(
        n: &PathBuf,
        g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        state: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, &g, &mut state, &mut stack) {
                let names: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
                panic!("import loop: {}", names.join(" -> "));
            }
        }
    }
}

#[test]
fn the_checker_sees_paths_and_groups() {
    let p =
        crate_paths("use crate::{a, b::c};\nlet x = crate::d::e(); // crate::f\ncaravan_agent::g");
    assert_eq!(
        p,
        vec![
            vec!["a".to_string()],
            vec!["b".into(), "c".into()],
            vec!["d".into(), "e".into()]
        ]
    );
    assert!(resolve(&src(), &["node".into(), "agent".into(), "Agent".into()]).is_some());
    assert_eq!(
        module_of(Path::new("node/fetch/mod.rs")).as_deref(),
        Some("node")
    );
}
