//! Models: the ONNX models of the registry and the rule-based fallback, behind
//! one `Model` type that turns a feature vector into a score and a decision.

pub mod onnx;
pub mod registry;

use std::path::PathBuf;

use schemas::features::FeatureSet;
use serde::{Deserialize, Serialize};

use crate::features::{self, Source, CARD_ENTITY, USER_ENTITY};

/// Features, scoring function, default decision and thresholds of a rule set.
type RuleSet = (
    &'static [&'static str],
    fn(&[f32]) -> f32,
    &'static str,
    [(&'static str, f32); 2],
);

/// Version label of the rule-based fallback.
pub const RULES_VERSION: &str = "rule-based-v1";

/// The models the server scores with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    Fraud,
    Propensity,
}

impl ModelKind {
    pub const ALL: [ModelKind; 2] = [ModelKind::Fraud, ModelKind::Propensity];

    /// The registry folder name and metric label.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Fraud => "fraud",
            ModelKind::Propensity => "propensity",
        }
    }

    /// The entities whose rows a request of this kind reads (by the
    /// request's `card_id`, `user_id`); the feature set must define them.
    pub fn entities(self) -> &'static [&'static str] {
        match self {
            ModelKind::Fraud => &[CARD_ENTITY, USER_ENTITY],
            ModelKind::Propensity => &[USER_ENTITY],
        }
    }

    /// Whether a request of this kind carries a transaction (propensity does not).
    pub fn has_transaction(self) -> bool {
        match self {
            ModelKind::Fraud => true,
            ModelKind::Propensity => false,
        }
    }

    /// Resolves a model's input names against the loaded feature set: the
    /// entities this kind reads must exist, and every name must resolve to an
    /// input this kind can compute. The error names the feature.
    pub fn plan<S: AsRef<str>>(self, names: &[S], set: &FeatureSet) -> Result<Vec<Source>, String> {
        for entity in self.entities() {
            if set.entity(entity).is_none() {
                return Err(format!(
                    "the feature set ({}) has no entity {entity}, whose rows /score/{} reads",
                    set.version,
                    self.name()
                ));
            }
        }
        names
            .iter()
            .map(|name| {
                let name = name.as_ref();
                let source = features::resolve(name, set).map_err(|e| e.to_string())?;
                if source.needs_transaction() && !self.has_transaction() {
                    return Err(format!(
                        "feature {name} is not available to {}: its requests carry no transaction",
                        self.name()
                    ));
                }
                if let Some(e) = source.entity() {
                    let entity = &set.entities[e].name;
                    if !self.entities().contains(&entity.as_str()) {
                        return Err(format!(
                            "feature {name} is not available to {}: its requests read only {} rows",
                            self.name(),
                            self.entities().join(" and ")
                        ));
                    }
                }
                Ok(source)
            })
            .collect()
    }
}

/// A decision threshold: scores at or above `min_score` get `decision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub decision: String,
    pub min_score: f32,
}

/// `metadata.json` of a registry version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metadata {
    /// The model name; must equal its registry folder.
    pub name: String,
    /// The version; must equal its registry folder.
    pub version: u32,
    /// The `FeatureSet::version` (`fs-...`) the model was trained on.
    pub feature_set_version: String,
    /// Input feature names in the model's column order (see `features`).
    pub features: Vec<String>,
    /// Name of the model's float input `[batch, features.len()]`.
    pub input_name: String,
    /// Name of the `[batch, classes]` probability output.
    pub output_name: String,
    /// Column of the output holding the score.
    pub positive_class_index: usize,
    /// Decision below the first threshold.
    pub default_decision: String,
    /// Ascending thresholds.
    pub thresholds: Vec<Threshold>,
    /// Training metrics and provenance, shown by `/models`.
    #[serde(default)]
    pub training: serde_json::Value,
    /// Per-feature and score histograms of the training data, for drift checks.
    #[serde(default)]
    pub reference_histograms: serde_json::Value,
}

/// Why a model could not be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
    #[error("onnx runtime: {0}")]
    Runtime(String),
    #[error("{RULES_VERSION} for {model}: {problem}")]
    Rules {
        model: &'static str,
        problem: String,
    },
}

/// How the model computes.
pub enum Engine {
    Onnx(onnx::OnnxEngine),
    Rules(fn(&[f32]) -> f32),
}

/// A loaded model, immutable; hot reload swaps the whole thing.
pub struct Model {
    pub kind: ModelKind,
    /// Registry version; 0 for the rule-based fallback.
    pub version: u32,
    /// `fraud-v3`, or `rule-based-v1`.
    pub label: String,
    pub features: Vec<String>,
    pub plan: Vec<Source>,
    pub default_decision: String,
    pub thresholds: Vec<Threshold>,
    pub path: Option<PathBuf>,
    pub training: serde_json::Value,
    pub loaded_at_ms: i64,
    pub engine: Engine,
    /// Served-value histograms against `reference_histograms` (none for
    /// the rules, a model without references, or drift detection off).
    pub drift: Option<crate::drift::Window>,
}

impl Model {
    /// `onnx` or `rules`.
    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Onnx(_) => "onnx",
            Engine::Rules(_) => "rules",
        }
    }

    /// The score of one feature vector (in `features` order).
    pub fn score(&self, x: &[f32]) -> Result<f32, ModelError> {
        match &self.engine {
            Engine::Onnx(e) => e.score(x),
            Engine::Rules(f) => Ok(f(x)),
        }
    }

    /// The decision for a score.
    pub fn decide(&self, score: f32) -> &str {
        self.thresholds
            .iter()
            .rev()
            .find(|t| score >= t.min_score)
            .map_or(self.default_decision.as_str(), |t| t.decision.as_str())
    }

    /// The rule-based fallback of a kind. Its inputs resolve against the
    /// loaded feature set like any model's, and fail the same way.
    pub fn rules(kind: ModelKind, set: &FeatureSet) -> Result<Model, ModelError> {
        let (names, f, default, thresholds): RuleSet = match kind {
            ModelKind::Fraud => (
                FRAUD_RULE_FEATURES,
                fraud_rules,
                "approve",
                [("review", 0.5), ("decline", 0.8)],
            ),
            ModelKind::Propensity => (
                PROPENSITY_RULE_FEATURES,
                propensity_rules,
                "low",
                [("medium", 0.2), ("high", 0.5)],
            ),
        };
        let plan = kind.plan(names, set).map_err(|problem| ModelError::Rules {
            model: kind.name(),
            problem,
        })?;
        Ok(Model {
            kind,
            version: 0,
            label: RULES_VERSION.to_owned(),
            features: names.iter().map(|s| s.to_string()).collect(),
            plan,
            default_decision: default.to_owned(),
            thresholds: thresholds
                .iter()
                .map(|(d, s)| Threshold {
                    decision: d.to_string(),
                    min_score: *s,
                })
                .collect(),
            path: None,
            training: serde_json::Value::Null,
            loaded_at_ms: now_ms(),
            engine: Engine::Rules(f),
            drift: None,
        })
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The inputs of the fraud rules. Like a registry model's metadata, these
/// must resolve against the loaded feature set.
const FRAUD_RULE_FEATURES: &[&str] = &[
    "amount_to_mean_24h",
    "country_mismatch",
    "card.txn_count_1m",
    "seconds_since_last_txn",
    "card_cold_start",
    "amount_log1p",
    "channel_ecom",
];

/// Additive fraud rules over `FRAUD_RULE_FEATURES`, clamped to [0, 1].
fn fraud_rules(x: &[f32]) -> f32 {
    let [ratio, mismatch, burst, since, cold, amount_log, ecom] =
        [x[0], x[1], x[2], x[3], x[4], x[5], x[6]];
    let mut s = 0.05;
    if ratio >= 5.0 {
        s += 0.35;
    } else if ratio >= 3.0 {
        s += 0.2;
    }
    if mismatch > 0.5 {
        s += 0.25;
    }
    if burst >= 3.0 {
        s += 0.2;
    }
    if since < 30.0 {
        s += 0.1;
    }
    // A first transaction of 500.00 or more (ln(1 + 50000) ≈ 10.82).
    if cold > 0.5 && amount_log >= 10.82 {
        s += 0.2;
    }
    if ecom > 0.5 {
        s += 0.05;
    }
    f32::clamp(s, 0.0, 1.0)
}

/// The inputs of the propensity rules (see `FRAUD_RULE_FEATURES`).
const PROPENSITY_RULE_FEATURES: &[&str] = &[
    "user.add_to_cart_count_1h",
    "user.purchase_count_24h",
    "user.click_count_1h",
];

/// Additive propensity rules over `PROPENSITY_RULE_FEATURES`, clamped to [0, 1].
fn propensity_rules(x: &[f32]) -> f32 {
    let s = 0.02 + 0.25 * x[0].min(2.0) + 0.1 * x[1].min(2.0) + 0.01 * x[2].min(20.0);
    s.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> FeatureSet {
        FeatureSet::parse("features.toml", include_str!("../../../features.toml")).unwrap()
    }

    #[test]
    fn rules_score_and_decide() {
        let set = shipped();
        let m = Model::rules(ModelKind::Fraud, &set).unwrap();
        assert_eq!(m.label, RULES_VERSION);
        let calm = m.score(&[1.0, 0.0, 0.0, 3600.0, 0.0, 8.0, 0.0]).unwrap();
        assert_eq!(m.decide(calm), "approve");
        let bad = m.score(&[10.0, 1.0, 4.0, 5.0, 0.0, 12.0, 1.0]).unwrap();
        assert_eq!(bad, 1.0);
        assert_eq!(m.decide(bad), "decline");
        assert_eq!(m.decide(0.5), "review");
        let p = Model::rules(ModelKind::Propensity, &set).unwrap();
        assert_eq!(p.decide(p.score(&[2.0, 0.0, 0.0]).unwrap()), "high");
    }

    #[test]
    fn plans_check_the_entities_and_the_transaction_of_the_kind() {
        let set = shipped();
        let err = ModelKind::Propensity
            .plan(&["user.click_count_1h", "amount_log1p"], &set)
            .unwrap_err();
        assert!(
            err.contains("feature amount_log1p is not available to propensity"),
            "{err}"
        );
        let err = ModelKind::Propensity
            .plan(&["card.txn_count_1m"], &set)
            .unwrap_err();
        assert!(err.contains("feature card.txn_count_1m is not available to propensity: its requests read only user rows"), "{err}");
        let err = ModelKind::Fraud.plan(&["card.nope"], &set).unwrap_err();
        assert!(err.contains("card.nope"), "{err}");
        assert_eq!(
            ModelKind::Fraud
                .plan(&["card.txn_count_1m", "user_cold_start"], &set)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn fraud_needs_a_card_entity_and_the_rules_name_what_is_missing() {
        let text = include_str!("../../../features.toml")
            .replace("entity = \"card\"", "entity = \"account\"")
            .replace("name = \"card\"", "name = \"account\"");
        let set = FeatureSet::parse("test.toml", &text).unwrap();
        let err = ModelKind::Fraud.plan(&["amount_log1p"], &set).unwrap_err();
        assert!(
            err.contains("has no entity card, whose rows /score/fraud reads"),
            "{err}"
        );
        assert!(Model::rules(ModelKind::Propensity, &set).is_ok());
        let err = Model::rules(ModelKind::Fraud, &set)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("rule-based-v1 for fraud: "), "{err}");
    }
}
