//! A 2-process timely cluster of the real binary (`-n 2 -p 0|1 --hostfile`)
//! over real Kafka and Redis writes exactly the rows of a 1-process run and of
//! the oracle over the same events.

mod stream_support;

use std::io::Write;
use std::time::Duration;

use stream_support::*;

#[test]
fn two_processes_write_the_rows_of_one() {
    let topics = Topics::new("cluster");
    generate(&topics, 4000, 11);

    let hostfile = std::env::temp_dir().join(format!("{}.hosts", unique("sfs-cluster")));
    let mut file = std::fs::File::create(&hostfile).unwrap();
    writeln!(file, "127.0.0.1:{}\n127.0.0.1:{}", free_port(), free_port()).unwrap();
    let hosts = hostfile.to_str().unwrap();

    let two = format!("{}:", unique("cluster2"));
    let processes = (0..2)
        .map(|p| {
            let p = p.to_string();
            spawn_stream(
                &topics,
                &two,
                &["-w", "1", "-n", "2", "-p", &p, "--hostfile", hosts],
            )
        })
        .collect();
    wait_all(processes, Duration::from_secs(120));
    let one = format!("{}:", unique("cluster1"));
    wait_all(
        vec![spawn_stream(&topics, &one, &["-w", "2"])],
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_file(&hostfile);

    let mut conn = redis();
    let frontier = progress_frontier(&mut conn, &two).expect("the cluster recorded progress");
    assert_eq!(
        progress_frontier(&mut conn, &one),
        Some(frontier),
        "same final frontier"
    );
    let (txns, clicks) = read_events(&topics);
    let oracle = oracle(SHIPPED, &txns, &clicks, frontier);
    assert!(oracle.len() > 50, "the oracle has rows");
    let rows_two = redis_rows(&mut conn, &two, SHIPPED);
    assert_rows_match_oracle(&rows_two, &oracle, frontier);
    // Values, not `_as_of`: a row's `_as_of` is the frontier at which its batch
    // was written, which depends on how fast each run's frontier moved.
    let values = |rows: &Rows| {
        rows.iter()
            .map(|(k, r)| (k.clone(), r.values.clone()))
            .collect::<Vec<_>>()
    };
    let (two, one) = (
        values(&rows_two),
        values(&redis_rows(&mut conn, &one, SHIPPED)),
    );
    let differing = two.iter().zip(&one).filter(|(a, b)| a != b).count();
    assert!(
        two.len() == one.len() && differing == 0,
        "2 processes wrote {} rows, 1 process {}; {differing} differ",
        two.len(),
        one.len()
    );
}
