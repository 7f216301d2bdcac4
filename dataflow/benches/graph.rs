//! Benchmark: the feature graph compiled from `features.toml`, fed from an
//! in-memory log, at several ticks and worker counts. Prints one JSON line
//! (machine, commit, config, per run: warm-up and steady-state events/s,
//! memory per live key).
//!
//! The default workload is a steady state: 3M events over 30 simulated hours
//! (~28 events per simulated second, 40% transactions, 200k cards, 100k
//! users), so after the first 24 simulated hours every window is full and
//! retracting. "warmup" covers the events before that point, "steady" the
//! ones after it; targets refer to "steady". The same runs repeat with every
//! window and the span divided by 60 (`window_scale` 60): the same state and
//! work per event at 60x the events per tick (see `main`).
//!
//! Run: `bash bench/dataflow/run.sh` (or `cargo bench -p dataflow --bench graph`).
//! Knobs (env): BENCH_EVENTS (default 3_000_000), BENCH_SIM_HOURS (default
//! 30) or BENCH_SIM_SECS, BENCH_TICKS_MS (default "1000,100,10"), BENCH_WORKERS (default "1,2"),
//! BENCH_FEATURES (default: the repository's features.toml),
//! BENCH_INFLIGHT_TICKS (default 5: ticks fed ahead of the output frontier), BENCH_BUILTIN
//! (default 1: also time DD's built-ins on the card counts, see
//! [`run_builtin`]; 0 skips it), BENCH_WINDOW_SCALES (default "1,60").

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::ProbeHandle;

use dataflow::compile::Event;
use dataflow::{build_features, events_collection, GraphConfig};
use schemas::event::{Channel, Click, ClickAction, Txn};
use schemas::FeatureSet;

const T0: i64 = 1_700_000_000_000;

/// Skewed id: a few hot keys, a long tail.
fn skewed(rng: &mut SmallRng, n: u64) -> u64 {
    let u: f64 = rng.gen();
    ((u * u * u) * n as f64) as u64
}

/// A realistic log: `events` events spread evenly over `span_ms` of event
/// time, 40% transactions, 200k cards, 100k users, 20k merchants, 30
/// countries, 40 categories; times within a second arrive out of order.
fn generate(events: usize, span_ms: i64, seed: u64) -> Vec<(i64, Event)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let countries: Vec<String> = (0..30)
        .map(|i| format!("{}{}", (b'A' + i / 26) as char, (b'A' + i % 26) as char))
        .collect();
    let mut log = Vec::with_capacity(events);
    for i in 0..events {
        let event_time =
            T0 + (i as i128 * span_ms as i128 / events as i128) as i64 + rng.gen_range(-500..500);
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

/// What one run measured.
struct Run {
    warmup: (usize, Duration),
    steady: (usize, Duration),
    row_changes: usize,
    live_keys: i64,
    /// Heap the dataflow holds at the end of the log (its state), bytes.
    state_bytes: i64,
}

/// Runs the log through the graph on `workers` threads, up to the frontier
/// past its last event (the retractions after the end of the log are not
/// part of a run: a bounded job stops at its final frontier). Times the
/// events before `T0 + warm_ms` (warm-up: the widest window filling) and
/// after (steady state) separately.
fn run(
    log: Arc<Vec<(i64, Event)>>,
    set: Arc<FeatureSet>,
    config: GraphConfig,
    workers: usize,
    warm_ms: i64,
) -> Run {
    let start = Arc::new(std::sync::Barrier::new(workers));
    let changes = Arc::new(AtomicUsize::new(0));
    let live = Arc::new(AtomicI64::new(0));
    let marks = Arc::new(Mutex::new((0usize, Duration::ZERO, Duration::ZERO)));
    // Heap after every worker's copy of its input, and at the end of the log.
    let heap = Arc::new(Mutex::new((0i64, 0i64)));
    let total_events = log.len();
    let inflight: u64 = env("BENCH_INFLIGHT_TICKS", 5);
    let (c2, l2, m2, h2) = (changes.clone(), live.clone(), marks.clone(), heap.clone());
    let txn = set
        .sources
        .iter()
        .position(|s| s.name == "txn")
        .expect("a txn source");
    let click = set
        .sources
        .iter()
        .position(|s| s.name == "click")
        .expect("a click source");
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let probe = ProbeHandle::new();
        let (counter, live) = (c2.clone(), l2.clone());
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, events) = scope.new_input::<Vec<(usize, Event)>>();
            build_features(events_collection(events), &set, &config)
                .inner
                .inspect_core(move |event| {
                    if let Ok((_, data)) = event {
                        counter.fetch_add(data.len(), Ordering::Relaxed);
                        live.fetch_add(
                            data.iter().map(|(_, _, d)| *d as i64).sum(),
                            Ordering::Relaxed,
                        );
                    }
                })
                .probe_with(&probe);
            input
        });
        // This worker's share, bucketed by tick, cloned before timing.
        let mut mine: Vec<(u64, (usize, Event))> = log
            .iter()
            .skip(index)
            .step_by(peers)
            .map(|(t, e)| {
                let source = match e {
                    Event::Txn(_) => txn,
                    Event::Click(_) => click,
                };
                (config.quantize(*t), (source, e.clone()))
            })
            .collect();
        mine.sort_by_key(|(t, _)| *t);
        let full = config.quantize(T0 + warm_ms);
        let warmup_events = mine.iter().filter(|(t, _)| *t < full).count();
        // The end is the log's last tick, the same for every worker: a worker
        // that stopped at its own last tick would drop its half of the
        // dataflow while others still need it (a hang with sparse logs).
        let last = log
            .iter()
            .map(|(t, _)| config.quantize(*t))
            .max()
            .unwrap_or(0);
        start.wait();
        if index == 0 {
            h2.lock().unwrap().0 = live_heap_bytes();
        }
        let began = Instant::now();
        let mut warmed: Option<Duration> = None;
        let mut i = 0;
        while i < mine.len() {
            let tick = mine[i].0;
            input.advance_to(tick);
            if tick >= full && warmed.is_none() {
                // Everything before the windows filled is done.
                while probe.less_than(&full) {
                    worker.step_or_park(Some(Duration::from_millis(1)));
                }
                warmed = Some(began.elapsed());
            }
            while i < mine.len() && mine[i].0 == tick {
                input.send(std::mem::replace(
                    &mut mine[i].1,
                    (0, Event::Click(empty_click())),
                ));
                i += 1;
            }
            // Keep at most a few ticks in flight.
            let lag = tick.saturating_sub(inflight * config.tick_ms);
            while probe.less_than(&lag) {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
        }
        input.advance_to(last + config.tick_ms);
        while probe.less_than(&(last + config.tick_ms)) {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        if index == 0 {
            let total = began.elapsed();
            let warm = warmed.unwrap_or(total);
            *m2.lock().unwrap() = (warmup_events * peers, warm, total - warm);
        }
        // Every worker is at the end of the log: the heap holds their state.
        start.wait();
        if index == 0 {
            h2.lock().unwrap().1 = live_heap_bytes();
        }
        start.wait();
        for dataflow in worker.installed_dataflows() {
            worker.drop_dataflow(dataflow);
        }
    })
    .expect("timely runs");
    let (warm_events, warm, steady) = *marks.lock().unwrap();
    Run {
        warmup: (warm_events, warm),
        steady: (total_events.saturating_sub(warm_events), steady),
        row_changes: changes.load(Ordering::Relaxed),
        live_keys: live.load(Ordering::Relaxed),
        state_bytes: {
            let (before, after) = *heap.lock().unwrap();
            after - before
        },
    }
}

/// The comparison that justifies a custom operator: the card counts of the
/// feature set's card windows with DD's built-ins alone, the cheapest way
/// they compose here (`count_total` over `(card, window)` records, the
/// retractions fed as input at `t + W` from per-window FIFO queues, since
/// future-dated retractions inside DD wait in its batcher; see
/// shared/NOTES-dd-performance.md). It computes 4 of the 22 features; the
/// graph run computes all of them. Returns events/s of the steady state.
fn run_builtin(
    log: Arc<Vec<(i64, Event)>>,
    windows: Vec<u64>,
    config: GraphConfig,
    workers: usize,
    warm_ms: i64,
) -> f64 {
    use differential_dataflow::input::InputSession;
    use differential_dataflow::operators::CountTotal;
    use std::collections::VecDeque;
    let start = Arc::new(std::sync::Barrier::new(workers));
    let marks = Arc::new(Mutex::new((0usize, Duration::ZERO)));
    let m2 = marks.clone();
    let inflight: u64 = env("BENCH_INFLIGHT_TICKS", 5);
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let probe = ProbeHandle::new();
        let mut input = InputSession::<u64, (String, u8), isize>::new();
        worker.dataflow::<u64, _, _>(|scope| {
            input
                .to_collection(scope)
                .count_total()
                .inner
                .probe_with(&probe);
        });
        let mut mine: Vec<(u64, String)> = log
            .iter()
            .skip(index)
            .step_by(peers)
            .filter_map(|(t, e)| match e {
                Event::Txn(x) => Some((config.quantize(*t), x.card_id.clone())),
                Event::Click(_) => None,
            })
            .collect();
        mine.sort();
        let full = config.quantize(T0 + warm_ms);
        let mut queues: Vec<VecDeque<(u64, String)>> =
            windows.iter().map(|_| VecDeque::new()).collect();
        // The same end on every worker (see `run`): a worker that stopped at
        // its own last tick would leave the others waiting for it.
        let last = log
            .iter()
            .map(|(t, _)| config.quantize(*t))
            .max()
            .unwrap_or(0);
        start.wait();
        let mut began = Instant::now();
        let mut steady_events = 0;
        let mut warmed = false;
        for (tick, card) in mine {
            if tick > *input.time() {
                // Departures due up to this tick, then move on.
                for (w, queue) in queues.iter_mut().enumerate() {
                    while queue.front().is_some_and(|(t, _)| t + windows[w] <= tick) {
                        let (t, card) = queue.pop_front().unwrap();
                        input.update_at((card, w as u8), t + windows[w], -1);
                    }
                }
                input.advance_to(tick);
                input.flush();
                let lag = tick.saturating_sub(inflight * config.tick_ms);
                while probe.less_than(&lag) {
                    worker.step_or_park(Some(Duration::from_millis(1)));
                }
                if tick >= full && !warmed {
                    while probe.less_than(&full) {
                        worker.step_or_park(Some(Duration::from_millis(1)));
                    }
                    warmed = true;
                    began = Instant::now();
                }
            }
            if warmed {
                steady_events += 1;
            }
            for (w, queue) in queues.iter_mut().enumerate() {
                input.insert((card.clone(), w as u8));
                queue.push_back((tick, card.clone()));
            }
        }
        let end = last + config.tick_ms;
        input.advance_to(end);
        input.flush();
        while probe.less_than(&end) {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        if index == 0 {
            *m2.lock().unwrap() = (steady_events * peers, began.elapsed());
        }
        for dataflow in worker.installed_dataflows() {
            worker.drop_dataflow(dataflow);
        }
    })
    .expect("timely runs");
    let (txns, elapsed) = *marks.lock().unwrap();
    // Per event of the log (txns are 40% of it), like the graph's figure.
    (txns as f64 / 0.4) / elapsed.as_secs_f64().max(1e-9)
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
    let events: usize = env("BENCH_EVENTS", 3_000_000);
    let hours: i64 = env("BENCH_SIM_HOURS", 30);
    let ticks: String = env("BENCH_TICKS_MS", "1000,100,10".to_string());
    let workers: String = env("BENCH_WORKERS", "1,2".to_string());
    let path: String = env(
        "BENCH_FEATURES",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml").to_string(),
    );
    let base = FeatureSet::load(&path).expect("valid feature definitions");
    // BENCH_SIM_SECS replaces the span (e.g. 400: the warm-up-only workload
    // of earlier versions, where the 1h and 24h windows never retract).
    let span_ms = env("BENCH_SIM_SECS", hours * 3_600) * 1000;
    let list =
        |s: &str| -> Vec<u64> { s.split(',').filter_map(|w| w.trim().parse().ok()).collect() };
    let mut results = Vec::new();
    // Scale 1: the real windows over 30 simulated hours, about 28 events
    // per simulated second: the steady state of a quiet stream, where a
    // 1 s tick holds a few dozen events and per-tick costs dominate. Scale
    // 60: every window and the span divided by 60 (1 min -> 1 s, 24 h ->
    // 24 min, 30 h -> 30 min), the same events per key per window, so the
    // same state and work per event, at 60x the events per tick (~1,700 at
    // 1 s): closer to a loaded stream, where a tick holds thousands.
    for scale in list(&env("BENCH_WINDOW_SCALES", "1,60".to_string())) {
        let mut scaled = base.clone();
        for entity in &mut scaled.entities {
            for feature in &mut Arc::make_mut(entity).features {
                feature.window_ms /= scale;
            }
        }
        let set = Arc::new(scaled);
        let warm_ms = set.widest_window_ms() as i64;
        let log = Arc::new(generate(events, span_ms / scale as i64, 42));
        for tick_ms in list(&ticks) {
            let config = GraphConfig { tick_ms };
            if let Err(e) = config.validate(&set) {
                eprintln!("window scale {scale}, tick {tick_ms} ms: skipped ({e})");
                continue;
            }
            for w in list(&workers) {
                let cpu_before = process_cpu_secs();
                let r = run(
                    log.clone(),
                    set.clone(),
                    config.clone(),
                    w as usize,
                    warm_ms,
                );
                let cpu = process_cpu_secs() - cpu_before;
                let rate = |(n, d): (usize, Duration)| n as f64 / d.as_secs_f64().max(1e-9);
                let (warm, steady) = (rate(r.warmup), rate(r.steady));
                let per_key = r.state_bytes as f64 / r.live_keys.max(1) as f64;
                let load = load_average();
                let builtin = if env("BENCH_BUILTIN", 1) == 1 {
                    let card = set.entity("card").expect("a card entity");
                    let counts: Vec<u64> = card
                        .features
                        .iter()
                        .filter(|f| f.aggregation == schemas::Aggregation::Count)
                        .map(|f| f.window_ms)
                        .collect();
                    format!(
                        "{:.0}",
                        run_builtin(log.clone(), counts, config.clone(), w as usize, warm_ms)
                    )
                } else {
                    "null".to_owned()
                };
                eprintln!(
                "window_scale={scale} tick={tick_ms}ms workers={w} dd_builtin_card_counts events/s={builtin} warmup events/s={warm:.0} steady events/s={steady:.0} \
                 cpu_secs={cpu:.1} row_changes={} live_keys={} bytes/live_key={per_key:.0} load={load}",
                r.row_changes, r.live_keys
            );
                results.push(format!(
                "{{\"window_scale\":{scale},\"tick_ms\":{tick_ms},\"workers\":{w},\"warmup_events_per_sec\":{warm:.0},\"steady_events_per_sec\":{steady:.0},\"dd_builtin_card_counts_steady_events_per_sec\":{builtin},\"warmup_events\":{},\"steady_events\":{},\"cpu_secs\":{cpu:.2},\"row_changes\":{},\"live_keys\":{},\"state_bytes\":{},\"bytes_per_live_key\":{per_key:.0},\"load_avg_1m\":{load}}}",
                r.warmup.0, r.steady.0, r.row_changes, r.live_keys, r.state_bytes
            ));
            }
        }
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
        "{{\"bench\":\"dataflow\",\"machine\":{{\"cpu\":\"{cpu}\",\"cores\":{cores}}},\"commit\":\"{commit}\",\"config\":{{\"events\":{events},\"sim_secs\":{},\"feature_set\":\"{}\",\"features\":{},\"allocator\":\"mimalloc\",\"cards\":200000,\"users\":100000,\"txn_share\":0.4}},\"results\":[{}]}}",
        span_ms / 1000,
        base.version,
        base.entities.iter().map(|e| e.features.len()).sum::<usize>(),
        results.join(",")
    );
}

/// The allocator `sfs` uses too (with glibc malloc the graph spends about a
/// third of its time in malloc/free), counting the bytes allocated and not
/// yet freed: the state a run holds, whatever the allocator keeps mapped
/// (RSS after an earlier run in the same process says nothing about it).
#[global_allocator]
static GLOBAL: Counting = Counting;

struct Counting;

/// Live heap bytes, flushed from each thread's count in steps of `FLUSH`.
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
const FLUSH: i64 = 64 << 10;

thread_local! {
    static UNFLUSHED: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

fn count(bytes: i64) {
    // `try_with`: during a thread's teardown the slot may be gone.
    let flushed = UNFLUSHED.try_with(|local| {
        let n = local.get() + bytes;
        if n.abs() >= FLUSH {
            LIVE_BYTES.fetch_add(n, Ordering::Relaxed);
            local.set(0);
        } else {
            local.set(n);
        }
    });
    if flushed.is_err() {
        LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Live heap bytes of the whole process (within `FLUSH` per thread).
fn live_heap_bytes() -> i64 {
    LIVE_BYTES.load(Ordering::Relaxed)
}

// `GlobalAlloc` is an unsafe trait; every call goes to mimalloc unchanged,
// with the caller's layout, after counting.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count(layout.size() as i64);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count(layout.size() as i64);
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        count(-(layout.size() as i64));
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        count(new as i64 - layout.size() as i64);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new) }
    }
}
