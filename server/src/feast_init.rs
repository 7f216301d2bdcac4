//! `sfs feast init DIR`: a Feast repository whose online store is this
//! server (`online_store: type: remote`), with the entities, feature views
//! and feature services of `features.toml`, so that Feast's Python SDK
//! (`FeatureStore(repo_path=DIR).get_online_features(...)`, after
//! `feast apply` in DIR) reads sfs's rows through `POST /get-online-features`.

use std::path::{Path, PathBuf};

use schemas::features::{FeatureSet, ValueKind};

use crate::serve::load_features;

/// `sfs feast init`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example:\n  sfs feast init feast_repo --url http://127.0.0.1:8080\n  cd feast_repo && feast apply\n  python -c 'from feast import FeatureStore; print(FeatureStore(\".\").get_online_features([\"card_features:txn_count_1h\"], [{\"card_id\": \"c1\"}]).to_dict())'"
)]
pub struct FeastInitArgs {
    /// The folder to write the repository to (created if missing).
    pub dir: PathBuf,
    /// URL of the `sfs serve` the SDK calls.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Feast project name (`feast_project` of the serve config).
    #[arg(long, default_value = crate::feast::DEFAULT_PROJECT)]
    pub project: String,
    /// Feature definitions (default: features.toml).
    #[arg(long, env = "SFS_FEATURES")]
    pub features: Option<PathBuf>,
}

/// The file names the repository is written as.
pub const STORE_YAML: &str = "feature_store.yaml";
pub const DEFINITIONS: &str = "sfs_features.py";

/// `feature_store.yaml`.
pub fn store_yaml(set: &FeatureSet, project: &str, url: &str) -> String {
    format!(
        "# Written by `sfs feast init` from the feature definitions ({version}).\n\
         # The online store is sfs serve: FeatureStore.get_online_features calls\n\
         # its POST /get-online-features. Run `feast apply` here once (and again\n\
         # after features.toml changes: rerun `sfs feast init` first).\n\
         project: {project}\n\
         provider: local\n\
         registry: data/registry.db\n\
         online_store:\n  type: remote\n  path: {url}\n\
         offline_store:\n  type: file\n\
         entity_key_serialization_version: 3\n",
        version = set.version,
    )
}

/// `sfs_features.py`: entities, feature views, feature services.
pub fn definitions(set: &FeatureSet) -> String {
    let mut py = format!(
        "# Written by `sfs feast init` from the feature definitions ({}).\n\
         # Do not edit: regenerate. Values are served by sfs (online only): the\n\
         # file sources are placeholders Feast requires, never read.\n\
         from datetime import timedelta\n\n\
         from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType\n\
         from feast.types import Float64, Int64\n",
        set.version
    );
    for e in &set.entities {
        py.push_str(&format!(
            "\nentity_{name} = Entity(name=\"{name}\", join_keys=[\"{key}\"], value_type=ValueType.STRING)\n\
             source_{name} = FileSource(\n    name=\"{name}_source\",\n    path=\"data/{name}.parquet\",\n    timestamp_field=\"event_timestamp\",\n)\n",
            name = e.name,
            key = e.key
        ));
    }
    for v in &set.views {
        let e = &set.entities[v.entity];
        let ttl = v.ttl_ms.map_or("timedelta(0)".to_owned(), |ms| {
            format!("timedelta(milliseconds={ms})")
        });
        py.push_str(&format!(
            "\nview_{name} = FeatureView(\n    name=\"{name}\",\n    entities=[entity_{entity}],\n    ttl={ttl},\n    schema=[\n",
            name = v.name,
            entity = e.name
        ));
        for &p in &v.features {
            let f = &e.features[p];
            let ty = match f.kind() {
                ValueKind::Int => "Int64",
                ValueKind::Float => "Float64",
            };
            py.push_str(&format!(
                "        Field(name=\"{}\", dtype={ty}),\n",
                f.name
            ));
        }
        py.push_str(&format!(
            "    ],\n    source=source_{},\n    online=True,\n)\n",
            e.name
        ));
    }
    for s in &set.services {
        py.push_str(&format!(
            "\nservice_{name} = FeatureService(\n    name=\"{name}\",\n    features=[\n",
            name = s.name
        ));
        // Consecutive features of one view make one projection.
        let mut i = 0;
        while i < s.features.len() {
            let view = s.features[i].0;
            let mut names = Vec::new();
            while i < s.features.len() && s.features[i].0 == view {
                let v = &set.views[view];
                names.push(format!(
                    "\"{}\"",
                    set.entities[v.entity].features[s.features[i].1].name
                ));
                i += 1;
            }
            let v = &set.views[view];
            if names.len() == v.features.len() {
                py.push_str(&format!("        view_{},\n", v.name));
            } else {
                py.push_str(&format!(
                    "        view_{}[[{}]],\n",
                    v.name,
                    names.join(", ")
                ));
            }
        }
        py.push_str("    ],\n)\n");
    }
    py
}

/// Writes the repository; returns the files written.
pub fn write(
    dir: &Path,
    set: &FeatureSet,
    project: &str,
    url: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir.join("data"))
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.join("data").display()))?;
    let files = [
        (dir.join(STORE_YAML), store_yaml(set, project, url)),
        (dir.join(DEFINITIONS), definitions(set)),
    ];
    let mut written = Vec::new();
    for (path, text) in files {
        std::fs::write(&path, text)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// `sfs feast init`: exits 2 on invalid definitions, like `sfs serve`.
pub fn run(args: FeastInitArgs) -> anyhow::Result<()> {
    let set = match load_features(args.features.as_deref()) {
        Ok(set) => set,
        Err(message) => {
            eprintln!("{}", message.replacen("sfs serve", "sfs feast init", 1));
            std::process::exit(2);
        }
    };
    if set.views.is_empty() {
        anyhow::bail!(
            "the feature definitions declare no [[feature_views]]: add one per entity (docs/FEATURES.md), then run again"
        );
    }
    if !(args.url.starts_with("http://") || args.url.starts_with("https://")) {
        anyhow::bail!("--url {}: not an http:// or https:// URL", args.url);
    }
    for path in write(&args.dir, &set, &args.project, &args.url)? {
        eprintln!("wrote {}", path.display());
    }
    println!(
        "Feast repository for project {} in {}: {} entities, {} feature views, {} feature services, online store {} ({}); next: cd {} && feast apply",
        args.project,
        args.dir.display(),
        set.entities.len(),
        set.views.len(),
        set.services.len(),
        args.url,
        set.version,
        args.dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_lists_every_view_and_service() {
        let set = FeatureSet::parse("features.toml", include_str!("../../features.toml")).unwrap();
        let yaml = store_yaml(&set, "sfs", "http://127.0.0.1:9");
        assert!(yaml.contains("online_store:\n  type: remote\n  path: http://127.0.0.1:9\n"));
        let py = definitions(&set);
        assert!(py.contains("entity_card = Entity(name=\"card\", join_keys=[\"card_id\"]"));
        assert!(py.contains("ttl=timedelta(milliseconds=3600000)"));
        assert!(py.contains("Field(name=\"amount_mean_24h\", dtype=Float64)"));
        assert!(py.contains("Field(name=\"txn_count_1m\", dtype=Int64)"));
        assert!(py.contains("name=\"fraud_v1\",\n    features=[\n        view_card_features,\n        view_user_features,\n"));
    }
}
