//! Keeps `README.md` and `docs/FEATURES.md` honest against the code:
//!
//! - every `sfs ...` command in their code (fenced blocks and inline spans)
//!   names subcommands that exist, with flags that the real binary's
//!   `--help` lists for that subcommand;
//! - every `make <target>` exists in the Makefile;
//! - every stream-config key they name (`[section] key`, `section.key`,
//!   "`key` in the stream config") is in `config/stream.example.toml`, and
//!   every "`key` in the serve config" in `server/serve.example.toml`;
//! - every repository path they name exists, and every test they cite next
//!   to its file is a function of that file;
//! - every TOML example of `docs/FEATURES.md` gets the verdict it claims from
//!   `sfs features` (valid, or `# invalid` and exit code 2 with the problems
//!   the document prints).
//!
//! Needs nothing running: only the binary and the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DOCS: &[&str] = &["README.md", "docs/FEATURES.md"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the sfs crate sits in the workspace")
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn sfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sfs"))
        .args(args)
        .current_dir(root())
        .env_remove("SFS_FEATURES")
        .env("SFS_LOG", "error")
        .output()
        .expect("the sfs binary runs")
}

/// A fenced code block: the line of its opening fence, its info string, its body.
struct Block {
    line: usize,
    info: String,
    body: String,
}

/// A document split into fenced blocks and inline code spans (with the line
/// each span starts on; a span may wrap lines, which become spaces).
struct Doc {
    blocks: Vec<Block>,
    spans: Vec<(usize, String)>,
    /// Markdown link targets, with their line.
    links: Vec<(usize, String)>,
}

fn parse(name: &'static str) -> Doc {
    let text = read(name);
    let mut blocks = Vec::new();
    let mut prose: Vec<(usize, &str)> = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let fence = line.trim_start().starts_with("```");
        match (&mut open, fence) {
            (None, true) => {
                open = Some(Block {
                    line: n,
                    info: line.trim_start()[3..].trim().to_owned(),
                    body: String::new(),
                })
            }
            (Some(_), true) => blocks.push(open.take().expect("a block is open")),
            (Some(b), false) => {
                b.body.push_str(line);
                b.body.push('\n');
            }
            (None, false) => prose.push((n, line)),
        }
    }
    assert!(open.is_none(), "{name}: a code fence is never closed");

    let mut spans = Vec::new();
    let mut links = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in &prose {
        for (j, c) in line.char_indices() {
            match (&mut current, c) {
                (None, '`') => current = Some((*n, String::new())),
                (Some(_), '`') => spans.push(current.take().expect("a span is open")),
                (Some((_, s)), c) => s.push(c),
                (None, '(') if line[..j].ends_with(']') => {
                    let rest = &line[j + 1..];
                    if let Some(end) = rest.find(')') {
                        links.push((*n, rest[..end].to_owned()));
                    }
                }
                (None, _) => {}
            }
        }
        if let Some((_, s)) = &mut current {
            s.push(' ');
        }
    }
    assert!(current.is_none(), "{name}: unbalanced backticks");
    Doc {
        blocks,
        spans,
        links,
    }
}

impl Doc {
    /// Every piece of code, with its line: each line of each fenced block
    /// (backslash continuations joined), then each inline span.
    fn code(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for b in &self.blocks {
            let mut pending = String::new();
            for (i, line) in b.body.lines().enumerate() {
                if let Some(head) = line.strip_suffix('\\') {
                    pending.push_str(head);
                    pending.push(' ');
                    continue;
                }
                pending.push_str(line);
                out.push((b.line + 1 + i, std::mem::take(&mut pending)));
            }
        }
        out.extend(self.spans.iter().cloned());
        out
    }
}

/// `sfs <path> --help`, cached.
struct Helps(BTreeMap<Vec<String>, Option<String>>);

impl Helps {
    fn get(&mut self, path: &[String]) -> Option<&str> {
        self.0
            .entry(path.to_vec())
            .or_insert_with(|| {
                let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
                args.push("--help");
                let out = sfs(&args);
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .as_deref()
    }

    /// The subcommands a help text lists under `Commands:`.
    fn subcommands(help: &str) -> BTreeSet<String> {
        help.lines()
            .skip_while(|l| l.trim() != "Commands:")
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect()
    }
}

/// Whether `help` lists `flag` (`--long` or `-s`) as a whole word.
fn lists_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let before = help[..i].chars().next_back();
        let after = help[i + flag.len()..].chars().next();
        before.is_none_or(|c| c.is_whitespace() || c == '[')
            && after.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    })
}

/// Where a command ends: a comment, a pipe, a redirect, a diagram arrow or a
/// parenthesised remark.
fn ends_command(token: &str) -> bool {
    token.starts_with(['#', '|', '>', '(', ';', '&', '<']) || token.contains("->")
}

/// Whether `token` runs the sfs binary (`sfs`, `.../release/sfs`, `"$(sfs`).
fn is_sfs(token: &str) -> bool {
    let t = token.trim_start_matches(['"', '\'', '$', '(']);
    t == "sfs" || t.ends_with("/sfs")
}

fn is_word(token: &str) -> bool {
    token.starts_with(|c: char| c.is_ascii_lowercase())
        && token
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The flag a token spells, if any: `--long` or `-s`, without brackets,
/// quotes, `=value` or trailing punctuation.
fn flag_of(token: &str) -> Option<String> {
    let t = token.trim_start_matches(['[', '"', '\'']);
    let t = t.split('=').next().unwrap_or(t);
    let t = t.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric()));
    let long = t.strip_prefix("--").is_some_and(is_word);
    let short = t.len() == 2
        && t.starts_with('-')
        && t.chars().nth(1).is_some_and(|c| c.is_ascii_alphabetic());
    (long || short).then(|| t.to_owned())
}

/// Checks every `sfs ...` command of a code piece; returns the problems.
fn check_commands(doc: &str, line: usize, code: &str, helps: &mut Helps) -> Vec<String> {
    let mut problems = Vec::new();
    let tokens: Vec<&str> = code.split_whitespace().collect();
    for (i, token) in tokens.iter().enumerate() {
        // `sfs` as cargo's package or binary (`--bin sfs`, `-p sfs`) is not a command.
        let cargo_arg = i > 0 && ["--bin", "-p", "--package"].contains(&tokens[i - 1]);
        if !is_sfs(token) || cargo_arg {
            continue;
        }
        let mut path: Vec<String> = Vec::new();
        let mut rest = tokens[i + 1..].iter().peekable();
        // The subcommand path: words, each a subcommand of the one before.
        while let Some(&&word) = rest.peek() {
            if !is_word(word) {
                break;
            }
            let Some(help) = helps.get(&path) else {
                break;
            };
            let subcommands = Helps::subcommands(help);
            if subcommands.is_empty() {
                problems.push(format!(
                    "{doc}:{line}: `sfs {}` takes no subcommand, got {word:?} in `{code}`",
                    path.join(" ")
                ));
                break;
            }
            if !subcommands.contains(word) {
                problems.push(format!(
                    "{doc}:{line}: `sfs {}` has no subcommand {word:?} (it has {subcommands:?}) in `{code}`",
                    path.join(" ")
                ));
                break;
            }
            path.push(word.to_owned());
            rest.next();
        }
        let Some(help) = helps.get(&path).map(str::to_owned) else {
            problems.push(format!(
                "{doc}:{line}: `sfs {} --help` fails",
                path.join(" ")
            ));
            continue;
        };
        for token in rest {
            if ends_command(token) || token.contains('<') && !token.starts_with('-') {
                break;
            }
            if let Some(flag) = flag_of(token) {
                if !lists_flag(&help, &flag) {
                    problems.push(format!(
                        "{doc}:{line}: `sfs {}` has no flag {flag} (not in its --help) in `{code}`",
                        path.join(" ")
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn every_sfs_command_in_the_docs_exists_with_its_flags() {
    let mut helps = Helps(BTreeMap::new());
    let mut problems = Vec::new();
    let mut commands = 0;
    for name in DOCS {
        let doc = parse(name);
        for (line, code) in doc.code() {
            if code.split_whitespace().any(is_sfs) {
                commands += 1;
            }
            problems.extend(check_commands(name, line, &code, &mut helps));
        }
    }
    assert!(
        commands > 20,
        "only {commands} sfs commands found: is the parser broken?"
    );
    // The subcommands the docs are about must all have been seen.
    for path in [
        &["features"][..],
        &["stream"],
        &["serve"],
        &["generate"],
        &["dlq", "replay"],
    ] {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        assert!(
            helps.0.contains_key(&path),
            "the docs never show `sfs {}`",
            path.join(" ")
        );
    }
    assert!(
        problems.is_empty(),
        "the docs disagree with the CLI:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_make_target_in_the_docs_exists() {
    let makefile = read("Makefile");
    let targets: BTreeSet<&str> = makefile
        .lines()
        .filter_map(|l| l.split_once(':').map(|(t, _)| t))
        .filter(|t| is_word(t))
        .collect();
    let mut problems = Vec::new();
    let mut seen = 0;
    for name in DOCS {
        for (line, code) in parse(name).code() {
            let tokens: Vec<&str> = code.split_whitespace().collect();
            for pair in tokens.windows(2) {
                if pair[0] == "make" && is_word(pair[1]) {
                    seen += 1;
                    if !targets.contains(pair[1]) {
                        problems.push(format!(
                            "{name}:{line}: no make target {:?} in `{code}`",
                            pair[1]
                        ));
                    }
                }
            }
        }
    }
    assert!(seen >= 10, "only {seen} make targets found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The value at a dotted path of a TOML table.
fn lookup<'a>(table: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.').try_fold(table, |v, key| v.get(key))
}

/// The dotted path of `[section] key` or `[section]` (not `[[array]]`).
fn bracketed(span: &str) -> Option<String> {
    let (section, key) = span.strip_prefix('[')?.split_once(']')?;
    let key = key.trim();
    let ident = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    };
    if !ident(section) || !(key.is_empty() || ident(key)) {
        return None;
    }
    Some(if key.is_empty() {
        section.to_owned()
    } else {
        format!("{section}.{key}")
    })
}

/// Whether a (possibly commented-out) `key = ...` line is in a config file.
fn names_key(text: &str, key: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim_start_matches(['#', ' ']);
        l.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

#[test]
fn every_config_key_in_the_docs_exists() {
    let stream_text = read("config/stream.example.toml");
    let stream: toml::Value =
        toml::from_str(&stream_text).expect("the stream example config is TOML");
    let sections: BTreeSet<String> = stream
        .as_table()
        .expect("a table")
        .iter()
        .filter(|(_, v)| v.is_table())
        .map(|(k, _)| k.clone())
        .collect();
    let serve_text = read("server/serve.example.toml");
    let is_key = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    };
    let mut problems = Vec::new();
    let mut checked = 0;
    for name in DOCS {
        let doc = parse(name);
        for (line, span) in &doc.spans {
            // `[section] key` (always the stream config) and `[section]`
            // (when it is one of the stream config's, not `[workspace]`).
            if let Some(path) = bracketed(span) {
                let first = path.split('.').next().unwrap_or_default();
                if span.ends_with(']') && !sections.contains(first) {
                    continue;
                }
                checked += 1;
                if lookup(&stream, &path).is_none() {
                    problems.push(format!(
                        "{name}:{line}: `{span}` is not in config/stream.example.toml"
                    ));
                }
                continue;
            }
            // `section.key`, for the stream config's sections (not `redis.sh`).
            let file = [".sh", ".toml", ".rs", ".md", ".json", ".py", ".yml", ".lua"]
                .iter()
                .any(|ext| span.ends_with(ext));
            if is_key(span) && span.contains('.') && !file {
                let first = span.split('.').next().unwrap_or_default();
                if sections.contains(first) {
                    checked += 1;
                    if lookup(&stream, span).is_none() {
                        problems.push(format!(
                            "{name}:{line}: `{span}` is not in config/stream.example.toml"
                        ));
                    }
                }
            }
        }
        // "`key` in the stream config" / "`key` in the serve config".
        let text = read(name).split_whitespace().collect::<Vec<_>>().join(" ");
        for (config, file) in [("stream", &stream_text), ("serve", &serve_text)] {
            let marker = format!("` in the {config} config");
            for (at, _) in text.match_indices(&marker) {
                let Some(open) = text[..at].rfind('`') else {
                    continue;
                };
                let key = &text[open + 1..at];
                checked += 1;
                let found = match config {
                    "stream" => {
                        let path = bracketed(key).unwrap_or_else(|| key.to_owned());
                        lookup(&stream, &path).is_some()
                    }
                    _ => names_key(file, key),
                };
                if !found {
                    problems.push(format!(
                        "{name}: `{key}` is not a key of the {config} example config"
                    ));
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} config keys found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_path_and_cited_test_in_the_docs_exists() {
    let root = root();
    let mut problems = Vec::new();
    for name in DOCS {
        let doc = parse(name);
        let dir = Path::new(name).parent().unwrap_or(Path::new(""));
        // Repository paths in spans: a first segment that exists, no placeholders.
        let mut by_line: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        for (line, span) in &doc.spans {
            by_line.entry(*line).or_default().push(span);
            let path_like = span.contains('/')
                && !span.starts_with(['.', '/', '~'])
                && span
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c));
            if path_like {
                let first = span.split('/').next().unwrap_or_default();
                if root.join(first).exists() && !root.join(span).exists() {
                    problems.push(format!("{name}:{line}: `{span}` does not exist"));
                }
            }
        }
        for (line, link) in &doc.links {
            let (target, anchor) = link.split_once('#').unwrap_or((link, ""));
            if link.contains("://") || target.starts_with("../") {
                continue;
            }
            let file = if target.is_empty() {
                PathBuf::from(name)
            } else {
                dir.join(target)
            };
            let Ok(text) = std::fs::read_to_string(root.join(&file)) else {
                problems.push(format!("{name}:{line}: link target {link} does not exist"));
                continue;
            };
            let headings: BTreeSet<String> = text
                .lines()
                .filter_map(|l| l.strip_prefix('#'))
                .map(|h| slug(h.trim_start_matches('#')))
                .collect();
            if !anchor.is_empty() && !headings.contains(anchor) {
                problems.push(format!(
                    "{name}:{line}: no heading #{anchor} in {}",
                    file.display()
                ));
            }
        }
        // A test name cited on the same line as its test file.
        for (line, spans) in by_line {
            let files: Vec<&str> = spans
                .iter()
                .copied()
                .filter(|s| s.contains("/tests/") && s.ends_with(".rs"))
                .collect();
            if files.is_empty() {
                continue;
            }
            let sources: Vec<String> = files
                .iter()
                .filter_map(|f| std::fs::read_to_string(root.join(f)).ok())
                .collect();
            for span in spans {
                let test_like = span.matches('_').count() >= 3
                    && span.starts_with(|c: char| c.is_ascii_lowercase())
                    && span
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if test_like && !sources.iter().any(|s| s.contains(&format!("fn {span}("))) {
                    problems.push(format!("{name}:{line}: no test `{span}` in {files:?}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_feature_examples_get_the_verdict_they_claim() {
    let doc = parse("docs/FEATURES.md");
    let shipped = read("features.toml");
    let mut problems = Vec::new();
    let mut errors = String::new();
    let mut examples = 0;
    for (i, block) in doc.blocks.iter().filter(|b| b.info == "toml").enumerate() {
        examples += 1;
        let invalid = block.body.trim_start().starts_with("# invalid");
        let text = if block.body.contains("[[sources]]") {
            block.body.clone()
        } else {
            format!("{shipped}\n{}", block.body)
        };
        let path = std::env::temp_dir().join(format!("sfs-readme-{}-{i}.toml", std::process::id()));
        std::fs::write(&path, &text).expect("temp file written");
        let out = sfs(&[
            "features",
            "--features",
            path.to_str().expect("utf-8 temp path"),
        ]);
        let _ = std::fs::remove_file(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match (invalid, out.status.code()) {
            (false, Some(0)) | (true, Some(2)) => {}
            (_, code) => problems.push(format!(
                "docs/FEATURES.md:{}: example claims {}, `sfs features` exited with {code:?}:\n{stderr}",
                block.line,
                if invalid { "invalid (exit 2)" } else { "valid" }
            )),
        }
        if invalid {
            errors.push_str(&stderr);
        }
    }
    assert!(examples >= 3, "only {examples} TOML examples found");
    // The problems the document prints are the ones the examples produce.
    for block in doc.blocks.iter().filter(|b| b.info == "text") {
        for line in block.body.lines().filter(|l| l.starts_with("  feature ")) {
            if !errors.contains(line) {
                problems.push(format!(
                    "docs/FEATURES.md:{}: printed problem {line:?} is not what the invalid examples produce:\n{errors}",
                    block.line
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
