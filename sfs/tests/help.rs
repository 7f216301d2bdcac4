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

/// `sfs features --json` lists the feature views and services of
/// `features.toml`, read here from the TOML itself: a view without a
/// `features` list holds every feature of its entity, and a service names
/// each feature as `view:feature`.
#[test]
fn features_json_lists_views_and_services() {
    let out = sfs(&["features", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml")).unwrap();
    let toml: toml::Table = text.parse().unwrap();
    let features = toml["features"].as_array().unwrap();
    let of_entity = |entity: &str| -> Vec<String> {
        features
            .iter()
            .filter(|f| f["entity"].as_str() == Some(entity))
            .map(|f| f["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut expected_views = std::collections::BTreeMap::new();
    for v in toml["feature_views"].as_array().unwrap() {
        let entity = v["entity"].as_str().unwrap();
        let names = match v.get("features") {
            Some(list) => list
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .collect(),
            None => of_entity(entity),
        };
        let ttl_ms = v.get("ttl").map(|t| {
            let t = t.as_str().unwrap();
            let (n, unit) = t.split_at(t.len() - 1);
            let unit_ms = match unit {
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                other => panic!("unit {other}"),
            };
            n.parse::<u64>().unwrap() * unit_ms
        });
        expected_views.insert(
            v["name"].as_str().unwrap().to_owned(),
            (entity.to_owned(), names, ttl_ms),
        );
    }
    let strings = |list: &serde_json::Value| -> Vec<String> {
        let list = list.as_array().unwrap();
        list.iter()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect()
    };
    let views = listed["feature_views"].as_array().unwrap();
    assert_eq!(views.len(), expected_views.len());
    for v in views {
        let (entity, names, ttl_ms) = &expected_views[v["name"].as_str().unwrap()];
        assert_eq!(v["entity"].as_str(), Some(entity.as_str()));
        assert_eq!(&strings(&v["features"]), names);
        assert_eq!(v["ttl_ms"].as_u64(), *ttl_ms);
    }
    let services = listed["feature_services"].as_array().unwrap();
    let expected_services = toml["feature_services"].as_array().unwrap();
    assert_eq!(services.len(), expected_services.len());
    for (got, want) in services.iter().zip(expected_services) {
        assert_eq!(got["name"], want["name"].as_str().unwrap());
        let expected: Vec<String> = want["features"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|entry| {
                let entry = entry.as_str().unwrap();
                match entry.split_once(':') {
                    Some(_) => vec![entry.to_owned()],
                    None => expected_views[entry]
                        .1
                        .iter()
                        .map(|f| format!("{entry}:{f}"))
                        .collect(),
                }
            })
            .collect();
        assert_eq!(strings(&got["features"]), expected);
    }
}
