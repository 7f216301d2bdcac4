//! Benchmark: the feature graph alone, fed from an in-memory log, on 1 and 2
//! workers. Prints one JSON line (machine, commit, config, events/s).
//!
//! Run: `bash bench/dataflow/run.sh` (or `cargo bench -p dataflow --bench graph`).
//! Knobs (env): BENCH_EVENTS (default 2_000_000), BENCH_RATE (event-time
//! events/s, default 5000), BENCH_WORKERS (default "1,2").

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::ProbeHandle;

use dataflow::{build_features, GraphConfig};
use schemas::event::{Channel, Click, ClickAction, Txn};

const T0: i64 = 1_700_000_000_000;

#[derive(Clone)]
enum Event {
    Txn(Txn),
    Click(Click),
}

/// Skewed id: a few hot keys, a long tail.
fn skewed(rng: &mut SmallRng, n: u64) -> u64 {
    let u: f64 = rng.gen();
    ((u * u * u) * n as f64) as u64
}

/// A realistic log: `events` events at `rate` events/s of event time, 40%
/// transactions, 200k cards, 100k users, 20k merchants, 30 countries, 40
/// categories; times within a second arrive out of order.
fn generate(events: usize, rate: u64, seed: u64) -> Vec<(i64, Event)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let countries: Vec<String> = (0..30).map(|i| format!("C{i:02}")).collect();
    let mut log = Vec::with_capacity(events);
    for i in 0..events {
        let event_time = T0 + (i as u64 * 1000 / rate) as i64 + rng.gen_range(-500..500);
        let user = skewed(&mut rng, 100_000);
        if rng.gen_bool(0.4) {
            log.push((
                event_time,
                Event::Txn(Txn {
                    event_id: format!("t{i}"),
                    card_id: format!("card-{}", skewed(&mut rng, 200_000)),
                    user_id: format!("user-{user}"),
                    merchant_id: format!("m-{}", skewed(&mut rng, 20_000)),
                    mcc: 5411,
                    amount_minor: rng.gen_range(100..50_000),
                    currency: "EUR".into(),
                    country: countries[skewed(&mut rng, 30) as usize].clone(),
                    channel: Channel::Pos,
                    event_time,
                    device_id: None,
                    ip_country: None,
                }),
            ));
        } else {
            log.push((
                event_time,
                Event::Click(Click {
                    event_id: format!("k{i}"),
                    user_id: format!("user-{user}"),
                    session_id: format!("s-{}", rng.gen_range(0..1_000_000)),
                    item_id: format!("item-{}", rng.gen_range(0..100_000)),
                    category: format!("cat-{}", skewed(&mut rng, 40)),
                    action: [
                        ClickAction::View,
                        ClickAction::View,
                        ClickAction::AddToCart,
                        ClickAction::Purchase,
                    ][rng.gen_range(0..4)],
                    event_time,
                    dwell_ms: None,
                }),
            ));
        }
    }
    log
}

/// Runs the whole log (and every retraction after it) through the graph on
/// `workers` threads; returns the wall time from the first event sent to the
/// empty frontier, generation excluded.
fn run(log: Arc<Vec<(i64, Event)>>, config: GraphConfig, workers: usize) -> (Duration, usize) {
    let start = Arc::new(std::sync::Barrier::new(workers));
    let updates = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let elapsed = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let (e2, u2) = (elapsed.clone(), updates.clone());
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let probe = ProbeHandle::new();
        let counter = u2.clone();
        let (mut txns, mut clicks) = worker.dataflow::<u64, _, _>(|scope| {
            let (txn_in, txns) = scope.new_input::<Vec<Txn>>();
            let (click_in, clicks) = scope.new_input::<Vec<Click>>();
            use timely::dataflow::operators::Inspect;
            build_features(txns, clicks, &config)
                .inspect_core(move |e| {
                    if let Ok((_, data)) = e {
                        counter.fetch_add(data.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                })
                .probe_with(&probe);
            (txn_in, click_in)
        });
        // This worker's share, bucketed by tick, cloned before timing.
        let mut mine: Vec<(u64, Event)> = log
            .iter()
            .skip(index)
            .step_by(peers)
            .map(|(t, e)| (config.quantize(*t), e.clone()))
            .collect();
        mine.sort_by_key(|(t, _)| *t);
        start.wait();
        let began = Instant::now();
        let mut i = 0;
        while i < mine.len() {
            let tick = mine[i].0;
            txns.advance_to(tick);
            clicks.advance_to(tick);
            while i < mine.len() && mine[i].0 == tick {
                match std::mem::replace(&mut mine[i].1, Event::Click(empty_click())) {
                    Event::Txn(t) => txns.send(t),
                    Event::Click(c) => clicks.send(c),
                }
                i += 1;
            }
            // Keep at most a few ticks in flight.
            let lag = tick.saturating_sub(5 * config.tick_ms);
            while probe.less_than(&lag) {
                // Park rather than spin while waiting on the other worker.
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
        }
        drop((txns, clicks));
        while !probe.done() {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        if index == 0 {
            *e2.lock().unwrap() = began.elapsed();
        }
    })
    .expect("timely runs");
    let elapsed = *elapsed.lock().unwrap();
    (elapsed, updates.load(std::sync::atomic::Ordering::Relaxed))
}

fn empty_click() -> Click {
    Click {
        event_id: String::new(),
        user_id: String::new(),
        session_id: String::new(),
        item_id: String::new(),
        category: String::new(),
        action: ClickAction::View,
        event_time: 0,
        dwell_ms: None,
    }
}

/// User + system CPU time of this process so far (Linux `/proc/self/stat`).
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks (100 Hz on Linux).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The 1-minute load average (`/proc/loadavg`), as a JSON number.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .filter(|l| l.parse::<f64>().is_ok())
        .unwrap_or_else(|| "null".into())
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let events: usize = env("BENCH_EVENTS", 2_000_000);
    let rate: u64 = env("BENCH_RATE", 5000);
    let workers: String = env("BENCH_WORKERS", "1,2".to_string());
    let config = GraphConfig::default();
    let log = Arc::new(generate(events, rate, 42));
    let mut results = Vec::new();
    for w in workers
        .split(',')
        .filter_map(|w| w.trim().parse::<usize>().ok())
    {
        let cpu_before = process_cpu_secs();
        let (elapsed, updates) = run(log.clone(), config.clone(), w);
        let cpu = process_cpu_secs() - cpu_before;
        let eps = events as f64 / elapsed.as_secs_f64();
        // Events per CPU-second of this process: less sensitive to other load
        // on a shared machine than wall-clock events/s.
        let eps_cpu = events as f64 / cpu.max(1e-9);
        let load = load_average();
        eprintln!(
            "workers={w} elapsed={elapsed:?} events/s={eps:.0} cpu_secs={cpu:.2} \
             events/cpu_s={eps_cpu:.0} row_updates={updates} load={load}"
        );
        results.push(format!(
            "\"{w}\":{{\"events_per_sec\":{eps:.0},\"secs\":{:.3},\"cpu_secs\":{cpu:.3},\"events_per_cpu_sec\":{eps_cpu:.0},\"row_updates\":{updates},\"load_avg_1m\":{load}}}",
            elapsed.as_secs_f64()
        ));
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "{{\"bench\":\"dataflow\",\"machine\":{{\"cpu\":\"{cpu}\",\"cores\":{cores}}},\"commit\":\"{commit}\",\"config\":{{\"events\":{events},\"event_rate_per_sec\":{rate},\"tick_ms\":{},\"allocator\":\"mimalloc\",\"cards\":200000,\"users\":100000,\"txn_share\":0.4}},\"results\":{{{}}}}}",
        config.tick_ms,
        results.join(",")
    );
}

/// The allocator `sfs` should use too: with glibc malloc the graph spends
/// about a third of its time in malloc/free.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
