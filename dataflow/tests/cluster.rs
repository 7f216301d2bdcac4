//! A 2-process timely cluster (each process a thread of this test calling
//! `timely::execute` with its own process index, talking TCP on loopback)
//! produces exactly the updates of a single process, and they match the oracle.

mod common;

use std::net::TcpListener;
use std::sync::Arc;

use common::{frontiers, random_log, run, run_shared, Shared, SHIPPED};
use dataflow::GraphConfig;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn two_processes_give_the_same_rows_as_one() {
    let config = GraphConfig::default();
    let log = Arc::new(random_log(77, 400));
    let defs = Arc::new(SHIPPED.to_owned());
    let frontiers = Arc::new(frontiers(&log, &defs, &config, 77));
    let single = run(
        timely::Config::process(1),
        log.clone(),
        defs.clone(),
        config.clone(),
        frontiers.clone(),
        true,
    );

    let addresses: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let shared = Shared::default();
    let processes: Vec<_> = (0..2)
        .map(|process| {
            let timely_config = timely::Config {
                communication: timely::CommunicationConfig::Cluster {
                    threads: 1,
                    process,
                    addresses: addresses.clone(),
                    report: false,
                    zerocopy: false,
                },
                worker: timely::WorkerConfig::default(),
            };
            let (log, defs, config, frontiers, shared) = (
                log.clone(),
                defs.clone(),
                config.clone(),
                frontiers.clone(),
                shared.clone(),
            );
            std::thread::spawn(move || {
                run_shared(timely_config, log, defs, config, frontiers, true, &shared)
            })
        })
        .collect();
    for p in processes {
        p.join().expect("process thread");
    }
    // Worker 0 (in process 0) checked every frontier against the oracle.
    assert!(*shared.checks.lock().unwrap() > frontiers.len());
    assert_eq!(shared.sorted(), single);
}
