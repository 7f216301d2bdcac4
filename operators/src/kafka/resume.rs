//! Per-partition resume points: from which offset a restart must re-read so
//! that every record still relevant to a frontier is replayed.
//!
//! A record at dataflow time `t` influences outputs at times in `[t, t + H)`,
//! where `H` is the horizon (the largest window plus any slack). To rebuild
//! the state of every output at times `>= F`, a restart must replay every
//! record with `t >= F - H`. The resume point for `F` is therefore the first
//! offset whose record has `t >= F - H`, together with the partition clock
//! just before it.
//!
//! The first offset with `t >= X` is always a strict prefix maximum of the
//! times (every earlier record is `< X`), so the tracker keeps only the
//! prefix maxima, in offset order; as `X` only grows, entries below it are
//! dropped for good. The tracker holds at most `H / tick` entries.

use std::collections::VecDeque;

use super::clock::ResumePoint;

#[derive(Debug, Clone)]
struct Entry {
    time: u64,
    /// The clock just before this record.
    before: ResumePoint,
    /// No prefix maximum was skipped between the previous entry and this one,
    /// so this is the first record at a time `>= self.time`.
    exact: bool,
}

/// Tracks the resume points of one partition.
///
/// To bound memory over long horizons, prefix maxima closer than the
/// granularity to the previous kept one are skipped; a query then falls back
/// to the previous entry (an earlier offset: a longer but still exact replay).
#[derive(Debug, Clone)]
pub struct ResumeTracker {
    horizon_ms: u64,
    granularity_ms: u64,
    /// Kept prefix maxima of record times since the tracker's start, in offset order.
    entries: VecDeque<Entry>,
    /// The largest time recorded, kept or not.
    max_time: Option<u64>,
    /// Whether a prefix maximum was skipped since the last kept entry.
    skipped: bool,
    /// The clock after the last record read.
    next: ResumePoint,
}

impl ResumeTracker {
    /// A tracker starting at `start`, resuming `horizon_ms` before the
    /// frontier, keeping entries at least `granularity_ms` apart (use the
    /// tick for exact answers).
    pub fn new(horizon_ms: u64, granularity_ms: u64, start: ResumePoint) -> ResumeTracker {
        ResumeTracker {
            horizon_ms,
            granularity_ms: granularity_ms.max(1),
            entries: VecDeque::new(),
            max_time: None,
            skipped: false,
            next: start,
        }
    }

    /// Records a record placed at dataflow `time`: `before` is the clock just
    /// before it (its offset is the record's), `after` the clock after it.
    pub fn record(&mut self, time: u64, before: ResumePoint, after: ResumePoint) {
        if self.max_time.is_none_or(|max| time > max) {
            self.max_time = Some(time);
            let far_enough = self
                .entries
                .back()
                .is_none_or(|last| time >= last.time.saturating_add(self.granularity_ms));
            if far_enough {
                self.entries.push_back(Entry {
                    time,
                    before,
                    exact: !self.skipped,
                });
                self.skipped = false;
            } else {
                self.skipped = true;
            }
        }
        self.next = after;
    }

    /// Moves past an offset that carried no record for the clock (a rejected
    /// record, or a gap such as a transaction marker).
    pub fn skip_to(&mut self, after: ResumePoint) {
        self.next = after;
    }

    /// A point at or before the first offset whose record is at a time `>= threshold`.
    fn find(&self, threshold: u64) -> ResumePoint {
        match self.entries.iter().position(|e| e.time >= threshold) {
            Some(i) if self.entries[i].exact || i == 0 => self.entries[i].before,
            Some(i) => self.entries[i - 1].before,
            None if self.skipped => self.entries.back().map_or(self.next, |e| e.before),
            None => self.next,
        }
    }

    /// Drops entries no query at `threshold` or later can need: all but the
    /// last entry below the threshold (kept as the fallback of a skip).
    fn prune(&mut self, threshold: u64) {
        while self.entries.len() >= 2 && self.entries[1].time < threshold {
            self.entries.pop_front();
        }
    }

    /// Where to restart so that outputs at times `>= frontier` are rebuilt
    /// exactly: at or before the first record at `frontier - horizon` or
    /// later. Call with non-decreasing frontiers.
    pub fn resume_for(&mut self, frontier: u64) -> ResumePoint {
        let threshold = frontier.saturating_sub(self.horizon_ms);
        self.prune(threshold);
        self.find(threshold)
    }

    /// An offset at or before the first record at a time `>= frontier`: the
    /// records before it are all reflected in outputs at `frontier`. Exact
    /// when the granularity is the tick. Used for the consumer-group commit,
    /// which lag tools read.
    pub fn durable_offset(&self, frontier: u64) -> i64 {
        self.find(frontier).offset
    }

    /// The clock after the last record read.
    pub fn next(&self) -> ResumePoint {
        self.next
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entries are held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::clock::{ClockConfig, PartitionClock};

    /// Brute force: the first offset whose time is `>= frontier - horizon`.
    fn oracle(times: &[u64], horizon: u64, frontier: u64) -> usize {
        let threshold = frontier.saturating_sub(horizon);
        times
            .iter()
            .position(|&t| t >= threshold)
            .unwrap_or(times.len())
    }

    #[test]
    fn resume_points_match_a_brute_force_search_and_replay_identically() {
        for granularity in [10, 40, 250] {
            check_resume_points(granularity);
        }
    }

    fn check_resume_points(granularity: u64) {
        let config = ClockConfig {
            tick_ms: 10,
            allowed_lateness_ms: 30,
            late_limit_ms: None,
        };
        // A deterministic pseudo-random walk with disorder.
        let mut x: u64 = 7;
        let events: Vec<i64> = (0..400)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (i * 7) as i64 + (x >> 58) as i64 * 5 - 100
            })
            .collect();
        let horizon = 120;
        let mut clock = PartitionClock::new(config, &ResumePoint::start(0));
        let mut tracker = ResumeTracker::new(horizon, granularity, ResumePoint::start(0));
        let mut times = Vec::new();
        for (offset, &e) in events.iter().enumerate() {
            let before = clock.resume_point(offset as i64);
            let t = clock.place(e).time().unwrap();
            times.push(t);
            tracker.record(t, before, clock.resume_point(offset as i64 + 1));
        }
        for frontier in (0..3000).step_by(37) {
            let point = tracker.resume_for(frontier);
            let exact = oracle(&times, horizon, frontier);
            if granularity == config.tick_ms {
                assert_eq!(point.offset as usize, exact, "frontier {frontier}");
            } else {
                assert!(
                    point.offset as usize <= exact,
                    "frontier {frontier}: {} > {exact}",
                    point.offset
                );
            }
            assert!(tracker.len() as u64 <= 3000 / granularity + 2);
            // Replaying from the point places every later record at the same time.
            let mut replay = PartitionClock::new(config, &point);
            for (offset, &e) in events.iter().enumerate().skip(point.offset as usize) {
                assert_eq!(replay.place(e).time(), Some(times[offset]));
            }
        }
        if granularity == config.tick_ms {
            assert_eq!(tracker.resume_for(u64::MAX).offset, events.len() as i64);
        }
    }

    #[test]
    fn durable_offsets_cover_only_records_before_the_frontier() {
        let mut tracker = ResumeTracker::new(0, 10, ResumePoint::start(5));
        let point = |offset| ResumePoint {
            offset,
            watermark_ms: 0,
            max_event_ms: None,
        };
        for (offset, t) in [(5, 10), (6, 30), (7, 20), (8, 40)] {
            tracker.record(t, point(offset), point(offset + 1));
        }
        assert_eq!(tracker.durable_offset(10), 5);
        assert_eq!(tracker.durable_offset(25), 6);
        assert_eq!(tracker.durable_offset(35), 8);
        assert_eq!(tracker.durable_offset(41), 9);
    }
}
