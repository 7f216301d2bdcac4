//! The alerting rules of `infra/prometheus/rules.yml` are valid
//! (`promtool check rules`) and behave as `infra/prometheus/rules.test.yml`
//! says (`promtool test rules`: e.g. `SfsFeatureDrift` fires after 10 minutes
//! of PSI above 0.2, not below it, not for a shorter excursion).
//!
//! promtool comes with Debian's `prometheus` package:
//! `bash infra/prometheus.sh install` (`make test` runs it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("infra/prometheus")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool does not run ({e}): install it with `bash infra/prometheus.sh install`"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_alerting_rules_are_valid() {
    let out = promtool(&["check", "rules", "rules.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_alerting_rules_pass_their_unit_tests() {
    let tests = std::fs::read_to_string(prometheus_dir().join("rules.test.yml")).unwrap();
    assert!(
        tests.contains("alertname: SfsFeatureDrift"),
        "the drift alert is tested"
    );
    let out = promtool(&["test", "rules", "rules.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}
