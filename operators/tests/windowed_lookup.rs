//! `windowed_lookup_with` against a brute-force oracle: random event
//! histories and lookups, 1 and 2 workers, work budgets down to one unit
//! (every time resumed mid-way), and the two inputs fed ahead of, behind or
//! in step with each other.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::{Input, InputSession};
use operators::aggregate::{Max, PerWindow, WindowedAggregate};
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;

/// Window lengths, in time units.
const WINDOWS: [u64; 3] = [3, 7, 20];
/// Times run over `0..HORIZON`.
const HORIZON: u64 = 120;

/// xorshift64*: a small deterministic generator for the histories.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// An event: (key, value, time).
type Event = (u32, i64, u64);
/// A lookup: (key, time).
type Asked = (u32, u64);
/// What a lookup found: the row and the time it was output at.
type Answer = Option<(Vec<Option<i64>>, u64)>;

/// Random events over a few keys (bursts at one time included) and random
/// lookups, some of keys that never have an event.
fn history(seed: u64) -> (Vec<Event>, Vec<Asked>) {
    let mut rng = Rng(seed | 1);
    let mut events = Vec::new();
    for key in 0..6u32 {
        let mut time = rng.below(10);
        while time < HORIZON - 10 {
            for _ in 0..=rng.below(3) {
                events.push((key, rng.below(100) as i64 - 50, time));
            }
            // Mostly short gaps; some longer than the widest window, so
            // that keys go idle (their state freed) and come back.
            time += match rng.below(5) {
                0 => 15 + rng.below(30),
                _ => rng.below(6),
            };
        }
    }
    let lookups = (0..60)
        .map(|_| (rng.below(7) as u32, rng.below(HORIZON)))
        .collect();
    (events, lookups)
}

/// The row of `key` as of `at`, by brute force: per window, the largest
/// value of the events with `at - window <= time < at`; no row when every
/// window is empty.
fn brute_force(events: &[Event], key: u32, at: u64) -> Option<Vec<Option<i64>>> {
    let row: Vec<Option<i64>> = WINDOWS
        .iter()
        .map(|window| {
            events
                .iter()
                .filter(|(k, _, time)| *k == key && *time < at && time + window >= at)
                .map(|(_, value, _)| *value)
                .max()
        })
        .collect();
    row.iter().any(Option::is_some).then_some(row)
}

/// Runs the lookups over the events on `workers` threads with `budget`
/// units of work per activation; returns, per lookup, what it found.
fn run(
    workers: usize,
    seed: u64,
    budget: usize,
    events: &[Event],
    lookups: &[Asked],
) -> Vec<Answer> {
    let found = Arc::new(Mutex::new(vec![None; lookups.len()]));
    let (events, lookups, out) = (events.to_vec(), lookups.to_vec(), Arc::clone(&found));
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let out = Arc::clone(&out);
        let probe = ProbeHandle::new();
        let (mut events_in, mut lookups_in) = worker.dataflow::<u64, _, _>(|scope| {
            let (events_in, values) = scope.new_collection::<(u32, i64), isize>();
            let (lookups_in, asked) = scope.new_collection::<(u32, u64), isize>();
            values
                .windowed_lookup_with(
                    asked,
                    "Max",
                    &WINDOWS,
                    PerWindow::<Max<i64>>::default(),
                    budget,
                    |key: &u32, lookup: u64, row| (*key, lookup, row),
                )
                .inner
                .inspect(move |((_, lookup, row), time, diff)| {
                    assert_eq!(*diff, 1, "one answer per lookup");
                    let mut found = out.lock().unwrap();
                    assert!(found[*lookup as usize].is_none(), "answered twice");
                    found[*lookup as usize] = Some((row.clone(), *time));
                })
                .probe_with(&probe);
            (events_in, lookups_in)
        });
        // This worker's share, fed time by time in a shuffled order. By the
        // seed, the lookups run ahead of the events (all of them before the
        // first event), or behind them, or in step.
        let mut rng = Rng(seed ^ ((index as u64 + 1) * 0x9e37_79b9));
        let feed_lookups = |lookups_in: &mut InputSession<_, _, _>, times: Range<u64>| {
            for (i, (key, at)) in lookups.iter().enumerate() {
                if i % peers == index && times.contains(at) {
                    lookups_in.update_at((*key, i as u64), *at, 1);
                }
            }
            lookups_in.advance_to(times.end);
            lookups_in.flush();
        };
        let lookups_ahead = seed % 3 == 1;
        let events_ahead = seed % 3 == 2;
        if lookups_ahead {
            feed_lookups(&mut lookups_in, 0..HORIZON);
        }
        for time in 0..HORIZON {
            let mut mine: Vec<_> = events
                .iter()
                .enumerate()
                .filter(|(i, e)| i % peers == index && e.2 == time)
                .map(|(_, e)| *e)
                .collect();
            for i in (1..mine.len()).rev() {
                mine.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for (key, value, t) in mine {
                events_in.update_at((key, value), t, 1);
                if rng.below(3) == 0 {
                    events_in.flush();
                    worker.step();
                }
            }
            events_in.advance_to(time + 1);
            events_in.flush();
            if !lookups_ahead && !events_ahead {
                feed_lookups(&mut lookups_in, time..time + 1);
            }
            worker.step();
        }
        if events_ahead {
            feed_lookups(&mut lookups_in, 0..HORIZON);
        }
        events_in.close();
        lookups_in.close();
        while worker.step_or_park(None) {}
    })
    .expect("timely runs");
    let found = found.lock().unwrap().clone();
    found
}

#[test]
fn lookups_see_the_windows_accumulated_strictly_before_their_time() {
    let (mut answered, mut idle) = (0, 0);
    for seed in 1..=24u64 {
        let (events, lookups) = history(seed);
        let budget = [1, 2, 5, 1 << 16][(seed % 4) as usize];
        for workers in [1, 2] {
            let found = run(workers, seed, budget, &events, &lookups);
            for (i, (key, at)) in lookups.iter().enumerate() {
                let expected = brute_force(&events, *key, *at).map(|row| (row, *at));
                answered += usize::from(expected.is_some());
                // A key with events before `at`, none inside its windows.
                idle += usize::from(
                    expected.is_none() && events.iter().any(|(k, _, t)| k == key && t < at),
                );
                assert_eq!(
                    found[i], expected,
                    "seed {seed}, {workers} workers, budget {budget}: lookup {i} of key {key} at {at}"
                );
            }
        }
    }
    // The histories must exercise a row found and a key gone idle.
    assert!(answered > 500, "only {answered} lookups found a row");
    assert!(idle > 100, "only {idle} lookups of idle keys");
}
