//! Helpers shared by the server's integration tests: real Redis, unique key
//! prefixes, the ONNX Runtime library, and requests without a socket.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use schemas::features::{pack_country, FeatureRow, FeatureSet, Value};
use server::{App, ServeConfig};

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix no other test run uses.
pub fn unique_prefix(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test:{test}:{}:{nanos}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The shipped feature definitions, `features.toml` of the workspace.
pub fn features() -> Arc<FeatureSet> {
    static SET: OnceLock<Arc<FeatureSet>> = OnceLock::new();
    SET.get_or_init(|| Arc::new(FeatureSet::load(workspace().join("features.toml")).unwrap()))
        .clone()
}

/// The shipped definitions edited by `edit`, written to a temp file (so the
/// server's loading path is exercised) and loaded.
pub fn edited_features(test: &str, edit: impl FnOnce(String) -> String) -> Arc<FeatureSet> {
    let text = std::fs::read_to_string(workspace().join("features.toml")).unwrap();
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit changes the definitions");
    let dir = temp_dir(test);
    let path = dir.join("features.toml");
    std::fs::write(&path, edited).unwrap();
    let set = FeatureSet::load(&path).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    Arc::new(set)
}

/// The shipped definitions without the feature block that starts with
/// `name = "{name}"` (the first one, if two entities share the name).
pub fn without_feature(text: String, name: &str) -> String {
    let start = text
        .find(&format!("[[features]]\nname = \"{name}\"\n"))
        .unwrap_or_else(|| panic!("no feature {name}"));
    let end = text[start + 1..]
        .find("[[features]]")
        .map_or(text.len(), |i| start + 1 + i);
    format!("{}{}", &text[..start], &text[end..])
}

/// libonnxruntime: ORT_DYLIB_PATH, else the workspace .venv. Fails loudly, never skips.
pub fn ort_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ORT_DYLIB_PATH={} is not a file", p.display());
        return p;
    }
    let venv_lib = workspace().join(".venv/lib");
    let found = std::fs::read_dir(&venv_lib).ok().and_then(|pythons| {
        pythons.flatten().find_map(|py| {
            let capi = py.path().join("site-packages/onnxruntime/capi");
            std::fs::read_dir(capi)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "libonnxruntime not found: set ORT_DYLIB_PATH or run `bash infra/python.sh install` (looked in {})",
            venv_lib.display()
        )
    })
}

/// A config for tests: a unique prefix and the given registry.
pub fn config(test: &str, models_dir: &Path) -> ServeConfig {
    ServeConfig {
        redis_url: redis_url(),
        key_prefix: unique_prefix(test),
        models_dir: models_dir.to_path_buf(),
        ort_dylib_path: Some(ort_path()),
        model_poll_ms: 50,
        ..ServeConfig::default()
    }
}

/// A fresh empty folder under the system temp dir.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_prefix(test).replace(':', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies `models/{name}/1` of the workspace into `registry/{name}/{version}`,
/// publishing it atomically (a dot-named folder renamed into place).
pub fn publish(
    registry: &Path,
    name: &str,
    version: u32,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    let src = workspace().join("models").join(name).join("1");
    let dst_parent = registry.join(name);
    std::fs::create_dir_all(&dst_parent).unwrap();
    let tmp = dst_parent.join(format!(".{version}.tmp"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("model.onnx"), tmp.join("model.onnx")).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("metadata.json")).unwrap()).unwrap();
    meta["version"] = version.into();
    edit(&mut meta);
    std::fs::write(tmp.join("metadata.json"), meta.to_string()).unwrap();
    std::fs::rename(&tmp, dst_parent.join(version.to_string())).unwrap();
}

pub async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Writes a row with the shared encoding (plus optional extra fields).
pub async fn write_row(url: &str, prefix: &str, row: &FeatureRow, extra: &[(&str, &str)]) {
    let mut conn = redis(url).await;
    let mut fields = row.encode_fields(&features().version);
    fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let _: () = redis::cmd("HSET")
        .arg(row.entity.redis_key(prefix, &row.id))
        .arg(fields)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A card row: mean 40.00, std 10.00, 5 txns in 24h, last one at
/// `last_txn_time`, mostly in DE (`top_country_24h`).
pub fn card_row(id: &str, as_of_ms: i64, last_txn_time: i64) -> FeatureRow {
    let card = features().entity("card").unwrap().clone();
    let values = card
        .features
        .iter()
        .map(|f| match f.name.as_str() {
            "txn_count_1m" => Value::Int(0),
            "txn_count_5m" => Value::Int(1),
            "txn_count_1h" => Value::Int(2),
            "txn_count_24h" => Value::Int(5),
            "amount_sum_1h" => Value::Int(8000),
            "amount_sum_24h" => Value::Int(20000),
            "amount_mean_24h" => Value::Float(4000.0),
            "amount_std_24h" => Value::Float(1000.0),
            "amount_max_24h" => Value::Int(6000),
            "last_txn_time" => Value::Int(last_txn_time),
            "top_country_24h" => Value::Int(pack_country("DE").unwrap()),
            _ => Value::Int(1),
        })
        .collect();
    FeatureRow {
        entity: card,
        id: id.into(),
        as_of_ms,
        values,
    }
}

pub fn user_row(id: &str, as_of_ms: i64, add_to_cart_1h: i64) -> FeatureRow {
    let user = features().entity("user").unwrap().clone();
    let values = user
        .features
        .iter()
        .map(|f| match f.name.as_str() {
            "add_to_cart_count_1h" => Value::Int(add_to_cart_1h),
            "click_count_1h" => Value::Int(12),
            "click_count_24h" => Value::Int(40),
            _ => Value::Int(1),
        })
        .collect();
    FeatureRow {
        entity: user,
        id: id.into(),
        as_of_ms,
        values,
    }
}

/// Sends one request through the app without a socket.
pub async fn call(
    app: &App,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let resp = app.handle(req).await;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    (status, json)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
