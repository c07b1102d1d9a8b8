//! The module graph of `src/` has no cycle: every `use` (and every path
//! written out) points one way. Read from the source text, so it needs no
//! tool installed and runs with the rest of the suite (and so in CI).
//!
//! Two graphs are checked:
//! - between files: `store::claim` → `model`, `cli::endpoint` → `cli::table`;
//! - between top-level modules, each directory taken as one: `cli` → `store`.
//!
//! What counts as an arrow: a path that names another module (`crate::…`,
//! `super::…`), in a `use` or written out in code. What does not: `mod x;`
//! (a parent declaring its child is not a dependency), a parent's
//! `pub use child::…` (a re-export is the child's own interface, not the
//! parent reaching in), and code under `#[cfg(test)]` (tests may reach
//! anywhere).
//!
//! `cargo test --test layering -- --nocapture --ignored` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One arrow and where it was written, to point at a cycle's cause.
#[derive(Debug, Clone)]
struct Arrow {
    to: String,
    path: String,
    file: PathBuf,
}

type Graph = BTreeMap<String, Vec<Arrow>>;

#[test]
fn no_file_imports_a_module_that_imports_it_back() {
    let graph = file_graph();
    assert!(graph.len() > 20, "too few modules read: {:?}", graph.keys());
    let cycles = cycles(&graph);
    assert!(
        cycles.is_empty(),
        "import cycles between files:\n{}",
        explain(&graph, &cycles)
    );
}

#[test]
fn no_top_level_module_imports_one_that_imports_it_back() {
    let graph = top_level(&file_graph());
    let cycles = cycles(&graph);
    assert!(
        cycles.is_empty(),
        "import cycles between top-level modules:\n{}",
        explain(&graph, &cycles)
    );
}

/// Every statement on `outbox.*` and every `sql/` file is the store's:
/// outside `src/store/`, no string literal holds SQL on the outbox tables
/// and nothing includes a file of `sql/`.
#[test]
fn only_the_store_speaks_sql_to_the_outbox() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut found = Vec::new();
    for file in files.iter().filter(|f| !f.starts_with(src.join("store"))) {
        let text = std::fs::read_to_string(file).expect("a source file is readable");
        for literal in string_literals(&text) {
            let upper = literal.to_uppercase();
            let statement = ["SELECT", "UPDATE", "INSERT", "DELETE"]
                .iter()
                .any(|k| upper.contains(k));
            if (statement && literal.contains("outbox.")) || literal.contains("sql/") {
                found.push(format!("{}: {literal:?}", file.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "SQL outside src/store/:\n{}",
        found.join("\n")
    );
}

/// The contents of the string literals of `text`, comments skipped.
fn string_literals(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match (chars[i], chars.get(i + 1)) {
            ('/', Some('/')) => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ('"', _) if !(i > 0 && chars[i - 1] == '\'') => {
                let mut literal = String::new();
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    if let Some(c) = chars.get(i) {
                        literal.push(*c);
                    }
                    i += 1;
                }
                out.push(literal);
                i += 1;
            }
            _ => i += 1,
        }
    }
    out
}

#[test]
#[ignore = "prints the graph; run with --ignored --nocapture"]
fn print_the_module_graph() {
    let files = file_graph();
    println!("# between top-level modules\n");
    print(&top_level(&files));
    println!("\n# between files\n");
    print(&files);
}

fn print(graph: &Graph) {
    for (from, arrows) in graph {
        let to: BTreeSet<&str> = arrows.iter().map(|a| a.to.as_str()).collect();
        let to: Vec<&str> = to.into_iter().collect();
        println!("{from} -> {}", to.join(", "));
    }
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for arrow in s.graph.get(v).into_iter().flatten() {
            let Some((w, _)) = s.graph.get_key_value(arrow.to.as_str()) else {
                continue;
            };
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            loop {
                let w = s.stack.pop().expect("v is on the stack");
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

/// Each cycle with the arrows inside it and where each was written.
fn explain(graph: &Graph, cycles: &[Vec<String>]) -> String {
    let mut out = String::new();
    for cycle in cycles {
        out.push_str(&format!("- {}\n", cycle.join(", ")));
        for from in cycle {
            for arrow in &graph[from] {
                if cycle.contains(&arrow.to) {
                    out.push_str(&format!(
                        "    {from} -> {} ({} in {})\n",
                        arrow.to,
                        arrow.path,
                        arrow.file.display()
                    ));
                }
            }
        }
    }
    out
}

/// Files collapsed into their top-level module.
fn top_level(files: &Graph) -> Graph {
    let head = |m: &str| m.split("::").next().unwrap_or(m).to_owned();
    let mut graph = Graph::new();
    for (from, arrows) in files {
        let entry = graph.entry(head(from)).or_default();
        for arrow in arrows {
            if head(&arrow.to) != head(from) {
                entry.push(Arrow {
                    to: head(&arrow.to),
                    ..arrow.clone()
                });
            }
        }
    }
    graph
}

fn file_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut modules: BTreeMap<String, String> = BTreeMap::new();
    for file in &files {
        if let Some(module) = module_of(&src, file) {
            let text = std::fs::read_to_string(file).expect("a source file is readable");
            modules.insert(module, code_only(&text));
        }
    }
    // `#[cfg(test)] mod tests;` files are tests, not part of the graph.
    let test_modules: BTreeSet<String> = modules
        .iter()
        .flat_map(|(module, code)| {
            test_children(code)
                .into_iter()
                .map(move |child| join(module, &child))
        })
        .collect();
    modules.retain(|m, _| !test_modules.contains(m));
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let mut graph = Graph::new();
    for (module, code) in &modules {
        let code = without_test_items(code);
        let file = files
            .iter()
            .find(|f| module_of(&src, f).as_deref() == Some(module))
            .expect("every module came from a file")
            .strip_prefix(src.parent().expect("src has a parent"))
            .expect("under the manifest dir")
            .to_path_buf();
        let mut arrows = Vec::new();
        let children = declared_children(&code);
        for (path, re_export) in paths(&code, &children) {
            let Some(full) = absolute(module, &path) else {
                continue;
            };
            let Some(to) = longest_module(&known, &full) else {
                continue;
            };
            let child_of_this = to.starts_with(&join(module, ""));
            if to == *module || (re_export && child_of_this) {
                continue;
            }
            arrows.push(Arrow {
                to,
                path: path.join("::"),
                file: file.clone(),
            });
        }
        graph.insert(module.clone(), arrows);
    }
    graph
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                walk(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
}

/// `src/store/claim.rs` is `store::claim`; `src/a/mod.rs` is `a`; the crate
/// roots (`lib.rs`, `main.rs`) are not modules of the graph.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
        return None;
    }
    Some(parts.join("::"))
}

fn join(module: &str, child: &str) -> String {
    format!("{module}::{child}")
}

/// The source without comments, string and character literals (their text
/// could look like paths).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
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
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&chars, i) {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            'raw: while j < chars.len() {
                if chars[j] == '"' && (0..hashes).all(|h| chars.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break 'raw;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A character literal ('a', '\n', '\u{..}'), or a lifetime.
            if next == Some('\\') {
                let mut j = i + 2;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                out.push_str("' '");
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// Children declared as `#[cfg(test)] mod name;`.
fn test_children(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        rest = &rest[at + "#[cfg(test)]".len()..];
        let item = rest.trim_start();
        if let Some(decl) = item.strip_prefix("mod ") {
            let name: String = decl
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if decl[name.len()..].trim_start().starts_with(';') {
                out.push(name);
            }
        }
    }
    out
}

/// The code with every `#[cfg(test)]` item cut out.
fn without_test_items(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let semi = after.find(';');
        let brace = after.find('{');
        let end = match (semi, brace) {
            (Some(s), Some(b)) if s < b => s + 1,
            (_, Some(b)) => b + matching_brace(&after[b..]),
            (Some(s), None) => s + 1,
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The length up to and including the brace that closes the one `text`
/// starts with.
fn matching_brace(text: &str) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    text.len()
}

/// The children this module declares with `mod name;` (test ones are cut
/// out before).
fn declared_children(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for statement in code.split([';', '{', '}']) {
        let words: Vec<&str> = statement.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "mod");
        if let Some(at) = at
            && at + 2 == words.len()
            && words[..at]
                .iter()
                .all(|w| w.starts_with("pub") || w.starts_with("#["))
        {
            out.push(words[at + 1].to_owned());
        }
    }
    out
}

/// Every path that starts at `crate`, `super`, `self` or one of this
/// module's `children` (as `child::…`), with `use` trees expanded, and
/// whether it was in a `pub use` (a re-export).
fn paths(code: &str, children: &[String]) -> Vec<(Vec<String>, bool)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let after_path = i >= 2 && chars[i - 1] == ':' && chars[i - 2] == ':';
        let starts = ["crate", "super", "self"]
            .into_iter()
            .chain(children.iter().map(String::as_str))
            .find(|w| starts_word(&chars, i, w) && !ident_before(&chars, i) && !after_path);
        if let Some(word) = starts {
            let mut j = i + word.len();
            skip_space(&chars, &mut j);
            if chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
                let re_export = statement_start(&chars, i).starts_with("pub use")
                    || statement_start(&chars, i).starts_with("pub(crate) use");
                let mut trees = Vec::new();
                let mut k = i;
                parse_tree(&chars, &mut k, Vec::new(), &mut trees);
                out.extend(trees.into_iter().map(|p| (p, re_export)));
                i = k.max(i + 1);
                continue;
            }
        }
        i += 1;
    }
    out
}

fn starts_word(chars: &[char], i: usize, word: &str) -> bool {
    let w: Vec<char> = word.chars().collect();
    chars.len() >= i + w.len()
        && chars[i..i + w.len()] == w[..]
        && !chars
            .get(i + w.len())
            .is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// The text of the statement `i` is in, from its start, trimmed.
fn statement_start(chars: &[char], i: usize) -> String {
    let mut s = i;
    while s > 0 && !matches!(chars[s - 1], ';' | '}' | '{') {
        s -= 1;
    }
    let text: String = chars[s..i].iter().collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn skip_space(chars: &[char], i: &mut usize) {
    while chars.get(*i).is_some_and(|c| c.is_whitespace()) {
        *i += 1;
    }
}

/// Reads a path or a use tree at `i`: `a::b::{c, d::e}` gives a::b::c and
/// a::b::d::e.
fn parse_tree(chars: &[char], i: &mut usize, mut prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    loop {
        skip_space(chars, i);
        if chars.get(*i) == Some(&'{') {
            *i += 1;
            loop {
                skip_space(chars, i);
                match chars.get(*i) {
                    Some('}') => {
                        *i += 1;
                        return;
                    }
                    Some(',') => *i += 1,
                    None => return,
                    _ => {
                        let before = *i;
                        parse_tree(chars, i, prefix.clone(), out);
                        if *i == before {
                            *i += 1;
                        }
                    }
                }
            }
        }
        let start = *i;
        while chars
            .get(*i)
            .is_some_and(|c| c.is_alphanumeric() || *c == '_')
        {
            *i += 1;
        }
        if *i == start {
            // `*` or something that ends the path.
            if chars.get(*i) == Some(&'*') {
                *i += 1;
            }
            out.push(prefix);
            return;
        }
        prefix.push(chars[start..*i].iter().collect());
        let mut j = *i;
        skip_space(chars, &mut j);
        if chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
            *i = j + 2;
        } else {
            out.push(prefix);
            return;
        }
    }
}

/// `path` as seen from `module`, from the crate root.
fn absolute(module: &str, path: &[String]) -> Option<Vec<String>> {
    let mut here: Vec<String> = module.split("::").map(str::to_owned).collect();
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            here.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                here.pop()?;
                rest = &rest[1..];
            }
        }
        // A child of this module, written relative to it.
        Some(_) => {}
        None => return None,
    }
    here.extend(rest.iter().cloned());
    Some(here)
}

fn longest_module(known: &BTreeSet<String>, full: &[String]) -> Option<String> {
    (1..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|m| known.contains(m))
}
