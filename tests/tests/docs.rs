//! Every relative link of every Markdown file in the repository resolves
//! inside the repository (a clone has nothing outside it), and every
//! `#anchor` names a heading of the page it points at (GitHub's slugs).

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use ember_tests::workspace_root;

/// The Markdown files of the repository: every `*.md` below the root but
/// in build output (`target/`) and hidden directories (`.git`).
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let ty = e.file_type().unwrap();
        if ty.is_dir() {
            if name != "target" && !name.starts_with('.') {
                markdown_files(&path, out);
            }
        } else if ty.is_file() && name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// `text` without fenced code blocks and inline code spans, line by line.
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fence = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = !fence;
            continue;
        }
        if fence {
            continue;
        }
        // Drop inline code: the text between pairs of backticks.
        let mut prose = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                prose.push(c);
            }
        }
        out.push((i + 1, prose));
    }
    out
}

/// The link destinations of `text` with their line: inline links and
/// images (`[text](dest "title")`, `![alt](dest)`) and reference
/// definitions (`[label]: dest`).
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose_lines(text) {
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let mut depth = 0;
            let mut end = None;
            for (i, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = Some(i);
                        break;
                    }
                    ')' => depth -= 1,
                    _ => {}
                }
            }
            let Some(end) = end else { break };
            let dest = after[..end].split_whitespace().next().unwrap_or("");
            out.push((
                n,
                dest.trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned(),
            ));
            rest = &after[end..];
        }
        let t = line.trim_start();
        if let Some((label, dest)) = t.strip_prefix('[').and_then(|r| r.split_once("]:")) {
            if !label.is_empty() && !label.contains(']') {
                if let Some(d) = dest.split_whitespace().next() {
                    out.push((n, d.to_owned()));
                }
            }
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped but `-`
/// and `_`, spaces made `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown page's headings (`#`-style), with GitHub's
/// `-1`, `-2` suffixes for repeated ones.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fence = !fence;
            continue;
        }
        if fence {
            continue;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let base = slug(&line[hashes..].replace('`', ""));
            let mut a = base.clone();
            let mut k = 0;
            while out.contains(&a) {
                k += 1;
                a = format!("{base}-{k}");
            }
            out.insert(a);
        }
    }
    out
}

/// `path` with `.` and `..` applied lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// What is wrong with each relative link of the page `file` whose text
/// is `text`, in a repository at `root`.
fn broken_links(root: &Path, file: &Path, text: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let shown = file
        .strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string();
    for (line, dest) in links(text) {
        let scheme = dest
            .split_once(':')
            .is_some_and(|(s, _)| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphabetic()));
        if dest.is_empty() || scheme {
            continue;
        }
        let (path, anchor) = match dest.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (dest.as_str(), None),
        };
        if path.is_empty() {
            let a = anchor.unwrap_or_default();
            if !anchors(text).contains(a) {
                bad.push(format!(
                    "{shown}:{line}: {dest}: no heading with anchor #{a}"
                ));
            }
            continue;
        }
        let target = if let Some(from_root) = path.strip_prefix('/') {
            root.join(from_root)
        } else {
            normalize(&file.parent().unwrap().join(path))
        };
        if !target.starts_with(root) {
            bad.push(format!("{shown}:{line}: {dest} leaves the repository"));
            continue;
        }
        if !target.exists() {
            bad.push(format!(
                "{shown}:{line}: {dest}: {} does not exist",
                target.display()
            ));
            continue;
        }
        if let Some(a) = anchor {
            let is_md = target.extension().is_some_and(|e| e == "md");
            if is_md {
                let page = std::fs::read_to_string(&target).unwrap();
                if !anchors(&page).contains(a) {
                    bad.push(format!(
                        "{shown}:{line}: {dest}: no heading with anchor #{a}"
                    ));
                }
            }
        }
    }
    bad
}

#[test]
fn every_relative_link_resolves_inside_the_repository() {
    let root = workspace_root();
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    files.sort();
    for must in ["README.md", "docs/concepts.md", "docs/design.md"] {
        assert!(files.contains(&root.join(must)), "{must} not found");
    }
    let mut bad = Vec::new();
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        checked += links(&text).len();
        bad.extend(broken_links(&root, f, &text));
    }
    assert!(checked > 50, "only {checked} links found in {files:?}");
    assert!(bad.is_empty(), "broken links:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_finds_what_is_broken() {
    let root = workspace_root();
    let file = root.join("docs/example.md");
    let text = "\
# A page

See [design](design.md#threads-in-emberd), [here](#a-page), [img](img/startup.svg),
[web](https://varlink.org) and `[code](nowhere.md)`.

```sh
[in a block](nowhere.md)
```

[out](../../shared/ARCHITECTURE.md) [gone](nowhere.md) [bad anchor](design.md#no-such-heading)
[self](#missing)

[ref]: ../../outside.md
";
    let bad = broken_links(&root, &file, text);
    assert_eq!(bad.len(), 5, "{bad:#?}");
    assert!(bad[0].contains("../../shared/ARCHITECTURE.md leaves the repository"));
    assert!(bad[1].contains("nowhere.md") && bad[1].contains("does not exist"));
    assert!(bad[2].contains("#no-such-heading"));
    assert!(bad[3].contains("#missing"));
    assert!(bad[4].contains("../../outside.md leaves the repository"));
    assert_eq!(
        slug("Releases: revisions and rollouts"),
        "releases-revisions-and-rollouts"
    );
    assert_eq!(
        slug("Where `entry` is looked for".replace('`', "").as_str()),
        "where-entry-is-looked-for"
    );
}
