//! The real schema registry (Apicurio, Confluent API) under the stream job:
//! `sfs generate` registers the schemas in it, the job resolves the ids from
//! it, and a registry outage pauses decoding without blocking the worker and
//! without dead-lettering a good record. This test starts its own registry
//! (infra/registry.sh on a free port, data in a temporary directory), stops
//! it before the job has resolved any id and starts it again mid-job.

mod stream_support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dataflow::metrics::Metrics;
use stream_support::*;

/// One registry instance of this test; stopped on drop.
struct Registry {
    port: u16,
    data: PathBuf,
}

impl Registry {
    fn script(&self, action: &str) -> bool {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        Command::new("bash")
            .arg(format!("{root}/infra/registry.sh"))
            .arg(action)
            .env("REGISTRY_PORT", self.port.to_string())
            .env("SFS_DATA", &self.data)
            .status()
            .expect("bash runs")
            .success()
    }

    fn start(&self) {
        assert!(self.script("start"), "infra/registry.sh start failed");
    }

    fn stop(&self) {
        assert!(self.script("stop"), "infra/registry.sh stop failed");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/apis/ccompat/v7", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.script("stop");
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The sum of every series of metric `name` in the Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name || metric.ends_with(&format!("_{name}")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_registry_outage_pauses_decoding_and_the_job_finishes_right_after_it() {
    let registry = Registry {
        port: free_port(),
        data: std::env::temp_dir().join(unique("registry")),
    };
    registry.start();
    // This test binary runs only this test: the variable is the job's and
    // the generator's registry.
    std::env::set_var(schemas::registry::REGISTRY_URL_ENV, registry.url());

    // The generator registers the schemas under the test topics' subjects.
    let topics = Topics::new("registry");
    generate(&topics, 3000, 23);
    let subjects = ureq::get(&format!("{}/subjects", registry.url()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let subjects: Vec<String> = serde_json::from_str(&subjects).unwrap();
    for topic in [&topics.txn, &topics.click] {
        assert!(
            subjects.contains(&format!("{topic}-value")),
            "{topic}-value registered: {subjects:?}"
        );
    }

    // Down before the job has resolved a single id.
    registry.stop();
    let prefix = format!("{}:", unique("registry"));
    let config = stream_config(&topics, &prefix, 2);
    let metrics = Metrics::new();
    let (done_tx, done_rx) = mpsc::channel();
    {
        let metrics = metrics.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(dataflow::worker::run(config, shipped(), metrics));
        });
    }

    // Decoding pauses; the workers keep stepping: the decode stage retries
    // on its timer, and the source's placer, after the stalled decoder in
    // the same worker, keeps reporting consumer lag.
    wait_until(Duration::from_secs(60), "decoding to pause", || {
        let text = metrics.encode();
        metric(&text, "source_decode_paused") >= 1.0
            && metric(&text, "source_decode_retries_total") >= 3.0
    });
    let before = metric(&metrics.encode(), "source_decode_retries_total");
    wait_until(Duration::from_secs(30), "lag reports while paused", || {
        metric(&metrics.encode(), "source_consumer_lag_records") > 0.0
    });
    wait_until(Duration::from_secs(30), "more retries", || {
        metric(&metrics.encode(), "source_decode_retries_total") > before + 1.0
    });
    let text = metrics.encode();
    assert_eq!(metric(&text, "source_rejected_records_total"), 0.0);
    assert!(
        done_rx.try_recv().is_err(),
        "the bounded job cannot finish without decoding"
    );
    let mut conn = redis();
    assert_eq!(
        progress_frontier(&mut conn, &prefix),
        None,
        "no progress is recorded past undecoded records"
    );

    // Back: the same ids (file storage), decoding resumes, the job ends.
    registry.start();
    let summary = done_rx
        .recv_timeout(Duration::from_secs(180))
        .expect("the job finishes after the registry is back")
        .expect("the bounded job runs");
    let frontier = summary
        .progress
        .expect("worker 0 recorded progress")
        .frontier_ms;
    let text = metrics.encode();
    assert_eq!(metric(&text, "source_decode_paused"), 0.0);
    assert_eq!(
        metric(&text, "source_rejected_records_total"),
        0.0,
        "no good record was dead-lettered"
    );

    assert_eq!(progress_frontier(&mut conn, &prefix), Some(frontier));
    let (txns, clicks) = read_events(&topics);
    assert!(
        txns.len() > 200 && clicks.len() > 800,
        "{} txns, {} clicks",
        txns.len(),
        clicks.len()
    );
    let expected = oracle(SHIPPED, &txns, &clicks, frontier);
    assert!(expected.len() > 50, "the oracle has rows");
    assert_rows_match_oracle(
        &redis_rows(&mut conn, &prefix, SHIPPED),
        &expected,
        frontier,
    );
}
