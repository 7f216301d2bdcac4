//! Feast's Python SDK reads sfs's rows: `sfs serve` on a free port (its own
//! Redis key prefix on the real Redis), `sfs feast init` writes the Feast
//! repository, and `feast_sdk.py` (run with the pinned feast==0.67.0 of
//! `.venv-feast`, `infra/python.sh install-feast`) writes rows, runs
//! `feast apply` and checks `FeatureStore.get_online_features`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server when the test ends, pass or fail.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn feast_python() -> PathBuf {
    match std::env::var_os("SFS_FEAST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => root().join(".venv-feast/bin/python"),
    }
}

#[test]
fn the_feast_sdk_reads_sfs_rows() {
    let python = feast_python();
    assert!(
        python.exists(),
        "{} is missing: run `bash infra/python.sh install-feast` (make test does)",
        python.display()
    );
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("test-feast-{}-{nanos}:", std::process::id());
    let tmp = std::env::temp_dir().join(format!("sfs-feast-{}-{nanos}", std::process::id()));
    let models = tmp.join("models"); // empty: the rule-based fallback, no ONNX Runtime needed
    std::fs::create_dir_all(&models).unwrap();
    let features = root().join("features.toml");
    let sfs = env!("CARGO_BIN_EXE_sfs");

    let version = Command::new(sfs)
        .args(["features", "--version", "--features"])
        .arg(&features)
        .output()
        .unwrap();
    assert!(version.status.success());
    let version = String::from_utf8(version.stdout).unwrap().trim().to_owned();

    let _server = Server(
        Command::new(sfs)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis-url", &redis, "--key-prefix", &prefix])
            .arg("--models-dir")
            .arg(&models)
            .arg("--features")
            .arg(&features)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sfs serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let repo = tmp.join("repo");
    let init = Command::new(sfs)
        .args(["feast", "init"])
        .arg(&repo)
        .args(["--url", &url, "--features"])
        .arg(&features)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let summary = String::from_utf8_lossy(&init.stdout);
    assert!(summary.contains("2 feature views"), "{summary}");

    let out = Command::new(&python)
        .arg(root().join("sfs/tests/feast_sdk.py"))
        .arg("--repo")
        .arg(&repo)
        .args(["--url", &url, "--redis", &redis, "--prefix", &prefix])
        .arg("--features")
        .arg(&features)
        .args(["--version", &version])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        out.status.success(),
        "feast_sdk.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
}
