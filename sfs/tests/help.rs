//! Every command's `--help` carries an example, and a failing command says
//! what to do next.

use std::process::Command;

fn sfs(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sfs"))
        .args(args)
        .env("SFS_LOG", "error")
        .env(
            "SFS_FEATURES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml"),
        )
        .output()
        .expect("the sfs binary runs")
}

/// The subcommands listed under "Commands:" of a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

#[test]
fn every_command_help_has_an_example() {
    let mut pending = vec![Vec::<String>::new()];
    let mut checked = 0;
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = sfs(&args);
        assert!(out.status.success(), "sfs {args:?} failed");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Example"),
            "`sfs {}` has no example:\n{help}",
            args.join(" ")
        );
        checked += 1;
        for sub in subcommands(&help) {
            let mut next = path.clone();
            next.push(sub);
            pending.push(next);
        }
    }
    assert!(checked >= 8, "only {checked} commands checked");
}

#[test]
fn a_failing_command_says_what_to_do_next() {
    // Nothing listens on port 1: the stream job cannot reach Redis.
    let out = sfs(&[
        "stream",
        "--until-end",
        "--metrics-listen",
        "",
        "--redis-url",
        "redis://127.0.0.1:1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:"), "{err}");
    assert!(err.contains("next: "), "{err}");
    assert!(err.contains("make health"), "{err}");
}
