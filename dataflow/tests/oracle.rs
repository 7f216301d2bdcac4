//! Reference-model tests: random logs through the feature graph on 1, 2 and 4
//! workers; at every checked frontier the rows equal the brute-force oracle.

mod common;

use std::sync::Arc;

use common::{frontiers, random_log, run};
use dataflow::GraphConfig;

fn check_seed(seed: u64, events: usize, config: GraphConfig) {
    let log = Arc::new(random_log(seed, events));
    let frontiers = Arc::new(frontiers(&log, &config, seed));
    let mut outputs = Vec::new();
    for workers in [1, 2, 4] {
        let out = run(
            timely::Config::process(workers),
            log.clone(),
            config.clone(),
            frontiers.clone(),
            true,
        );
        assert!(!out.is_empty());
        outputs.push(out);
    }
    assert_eq!(
        outputs[0], outputs[1],
        "1 and 2 workers differ (seed {seed})"
    );
    assert_eq!(
        outputs[0], outputs[2],
        "1 and 4 workers differ (seed {seed})"
    );
}

#[test]
fn rows_match_the_oracle_at_every_frontier_on_1_2_and_4_workers() {
    for seed in 0..4 {
        check_seed(seed, 400, GraphConfig::default());
    }
}

#[test]
fn rows_match_the_oracle_with_a_one_minute_tick() {
    for seed in 10..12 {
        check_seed(seed, 400, GraphConfig { tick_ms: 60_000 });
    }
}
