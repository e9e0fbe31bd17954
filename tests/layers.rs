//! The layer guard: a module of `src/` may import only modules of lower layers (or its own).
//! The order is written down here once; `src/lib.rs` and `docs/design.md` describe it. Every
//! `crate::<module>` path in code counts (comments do not), test modules included, so a test
//! that needs a higher layer lives in that layer.
use std::collections::BTreeSet;
use std::path::Path;

/// Layers, lowest first; modules on one line share a layer and may not import each other.
const LAYERS: &[&[&str]] = &[
    &["util", "profile", "hub"],
    &["cuda"],
    &["kvcache"],
    &["model"],
    &["data"],
    &["engine"],
    &["compress"],
    &["eval", "bench"],
    &["report"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Code without comments (`//` to the end of the line, `/* */`), string literals blanked.
fn code_only(src: &str) -> String {
    let (mut out, b) = (String::with_capacity(src.len()), src.as_bytes());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += src[i..].find("*/").map_or(b.len() - i, |e| e + 2);
        } else if b[i] == b'"' && (i == 0 || b[i - 1] != b'\'') {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            let c = src[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `crate::<name>` references in `code`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = code[i + 7..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            // `use crate::{a, b}`: every name of the group's first level.
            if let Some(rest) = code[i + 7..].strip_prefix('{') {
                let group = &rest[..rest.find('}').unwrap_or(rest.len())];
                refs.extend(
                    group
                        .split(',')
                        .map(|p| p.trim().split("::").next().unwrap_or("").to_string())
                        .filter(|p| !p.is_empty()),
                );
            }
        } else {
            refs.insert(name);
        }
    }
    refs
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut bad = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = top.trim_end_matches(".rs").to_string();
        if ["main", "lib", "bin"].contains(&module.as_str()) {
            continue; // the binaries and the crate root sit above every layer
        }
        let Some(own) = layer_of(&module) else {
            bad.push(format!(
                "src/{module}: not in the layer list of tests/layers.rs; add it there"
            ));
            continue;
        };
        seen.insert(module.clone());
        let code = code_only(&std::fs::read_to_string(f).unwrap());
        for r in crate_refs(&code) {
            let Some(theirs) = layer_of(&r) else { continue };
            if r != module && theirs >= own {
                bad.push(format!(
                    "{}: {module} (layer {own}) uses crate::{r} (layer {theirs})",
                    rel.display()
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "upward or sideways imports:\n{}",
        bad.join("\n")
    );
    // The guard reads what it should: every listed module exists and most were scanned.
    for l in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(seen.contains(*l), "layer module {l} not found under src/");
    }
}

#[test]
fn the_guard_sees_code_not_comments() {
    let code = code_only(
        "use crate::cli::X; // crate::report\n/* crate::eval */ let s = \"crate::bench\";\nuse crate::{data::a, model};",
    );
    let refs = crate_refs(&code);
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["cli", "data", "model"]
    );
}
