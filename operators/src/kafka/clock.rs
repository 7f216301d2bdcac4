//! The event-time clock of one partition: its watermark, and where each
//! record lands in dataflow time.
//!
//! The clock depends on the partition's records alone (plus wall-clock idle
//! advances, which are opt-in), so a replay from a [`ResumePoint`] makes
//! exactly the decisions the first run made.

use serde::{Deserialize, Serialize};

/// How event time maps to dataflow time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockConfig {
    /// Dataflow times are event times quantized down to a multiple of this.
    pub tick_ms: u64,
    /// The watermark trails the largest event time seen by this much.
    pub allowed_lateness_ms: u64,
    /// A record more than this far behind the watermark is not clamped but
    /// rejected (dead-lettered). `None`: clamp every late record.
    pub late_limit_ms: Option<u64>,
}

impl ClockConfig {
    /// `ms` quantized down to the tick.
    pub fn quantize(&self, ms: u64) -> u64 {
        let tick = self.tick_ms.max(1);
        ms - ms % tick
    }
}

/// The clock state at a point in a partition: enough to restart reading there
/// and make the same decisions as the first run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// The next offset to read.
    pub offset: i64,
    /// The partition's watermark (dataflow time, ms) before reading `offset`.
    pub watermark_ms: u64,
    /// The largest event time (ms) seen before `offset`, if any.
    pub max_event_ms: Option<i64>,
}

impl ResumePoint {
    /// The start of a partition that has never been read.
    pub fn start(offset: i64) -> ResumePoint {
        ResumePoint {
            offset,
            watermark_ms: 0,
            max_event_ms: None,
        }
    }
}

/// Where a record lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// At its own quantized event time.
    OnTime(u64),
    /// Behind the watermark: clamped up to it (`behind_ms` = watermark - event time).
    Late { time: u64, behind_ms: u64 },
    /// Further behind the watermark than the hard limit: reject.
    TooLate { watermark_ms: u64, behind_ms: u64 },
}

impl Placement {
    /// The dataflow time, unless rejected.
    pub fn time(self) -> Option<u64> {
        match self {
            Placement::OnTime(t) | Placement::Late { time: t, .. } => Some(t),
            Placement::TooLate { .. } => None,
        }
    }
}

/// The watermark of one partition.
#[derive(Debug, Clone)]
pub struct PartitionClock {
    config: ClockConfig,
    watermark: u64,
    max_event: Option<i64>,
}

impl PartitionClock {
    /// A clock restarted at `at`.
    pub fn new(config: ClockConfig, at: &ResumePoint) -> PartitionClock {
        PartitionClock {
            config,
            watermark: config.quantize(at.watermark_ms),
            max_event: at.max_event_ms,
        }
    }

    /// The watermark: no record will be placed before it. Only advances.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// The largest event time seen.
    pub fn max_event(&self) -> Option<i64> {
        self.max_event
    }

    /// Places a record with event time `event_ms` and advances the watermark.
    pub fn place(&mut self, event_ms: i64) -> Placement {
        let event = u64::try_from(event_ms).unwrap_or(0);
        let quantized = self.config.quantize(event);
        let placement = if quantized >= self.watermark {
            Placement::OnTime(quantized)
        } else {
            let behind_ms = self.watermark - event;
            match self.config.late_limit_ms {
                Some(limit) if behind_ms > limit => {
                    return Placement::TooLate {
                        watermark_ms: self.watermark,
                        behind_ms,
                    };
                }
                _ => Placement::Late {
                    time: self.watermark,
                    behind_ms,
                },
            }
        };
        if self.max_event.is_none_or(|max| event_ms > max) {
            self.max_event = Some(event_ms);
            let trailing = event.saturating_sub(self.config.allowed_lateness_ms);
            self.watermark = self.watermark.max(self.config.quantize(trailing));
        }
        placement
    }

    /// Advances the watermark with the wall clock (an idle partition):
    /// to `now_ms` minus the allowed lateness. Returns whether it moved.
    pub fn advance_idle(&mut self, now_ms: u64) -> bool {
        let target = self
            .config
            .quantize(now_ms.saturating_sub(self.config.allowed_lateness_ms));
        if target > self.watermark {
            self.watermark = target;
            true
        } else {
            false
        }
    }

    /// The partition is complete (bounded mode): advances the watermark past
    /// every event seen, ignoring the allowed lateness, and returns it.
    pub fn finish(&mut self) -> u64 {
        if let Some(max) = self.max_event {
            let past =
                self.config.quantize(u64::try_from(max).unwrap_or(0)) + self.config.tick_ms.max(1);
            self.watermark = self.watermark.max(past);
        }
        self.watermark
    }

    /// The state to restart at `offset`, the next offset after the records placed so far.
    pub fn resume_point(&self, offset: i64) -> ResumePoint {
        ResumePoint {
            offset,
            watermark_ms: self.watermark,
            max_event_ms: self.max_event,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(lateness: u64, limit: Option<u64>) -> PartitionClock {
        let config = ClockConfig {
            tick_ms: 10,
            allowed_lateness_ms: lateness,
            late_limit_ms: limit,
        };
        PartitionClock::new(config, &ResumePoint::start(0))
    }

    #[test]
    fn on_time_records_land_on_their_quantized_time() {
        let mut c = clock(0, None);
        assert_eq!(c.place(105), Placement::OnTime(100));
        assert_eq!(c.watermark(), 100);
        assert_eq!(c.place(100), Placement::OnTime(100));
        assert_eq!(c.place(131), Placement::OnTime(130));
    }

    #[test]
    fn the_watermark_trails_by_the_allowed_lateness() {
        let mut c = clock(50, None);
        assert_eq!(c.place(1000), Placement::OnTime(1000));
        assert_eq!(c.watermark(), 950);
        assert_eq!(c.place(955), Placement::OnTime(950));
        assert_eq!(
            c.place(949),
            Placement::Late {
                time: 950,
                behind_ms: 1
            }
        );
        assert_eq!(c.watermark(), 950, "late records never move the watermark");
    }

    #[test]
    fn records_past_the_hard_limit_are_rejected_and_do_not_move_the_clock() {
        let mut c = clock(0, Some(100));
        c.place(1000);
        assert_eq!(
            c.place(950),
            Placement::Late {
                time: 1000,
                behind_ms: 50
            }
        );
        assert_eq!(
            c.place(899),
            Placement::TooLate {
                watermark_ms: 1000,
                behind_ms: 101
            }
        );
        assert_eq!(c.max_event(), Some(1000));
    }

    #[test]
    fn negative_event_times_are_late_not_a_panic() {
        let mut c = clock(0, None);
        c.place(500);
        assert_eq!(
            c.place(-5),
            Placement::Late {
                time: 500,
                behind_ms: 500
            }
        );
    }

    #[test]
    fn a_replay_from_a_resume_point_makes_the_same_decisions() {
        let events = [100, 250, 90, 400, 380, 120, 700, 650, 20, 900];
        let mut first = clock(100, Some(400));
        let mut resume = None;
        let mut placements = Vec::new();
        for (i, &e) in events.iter().enumerate() {
            if i == 4 {
                resume = Some(first.resume_point(i as i64));
            }
            placements.push(first.place(e));
        }
        let resume = resume.unwrap();
        let mut second = PartitionClock::new(first.config, &resume);
        let replayed: Vec<_> = events[4..].iter().map(|&e| second.place(e)).collect();
        assert_eq!(replayed, placements[4..]);
        assert_eq!(second.watermark(), first.watermark());
    }

    #[test]
    fn idle_advances_follow_the_wall_clock_and_finish_passes_every_event() {
        let mut c = clock(20, None);
        c.place(1000);
        assert!(c.advance_idle(5000));
        assert_eq!(c.watermark(), 4980);
        assert!(!c.advance_idle(10));
        let mut d = clock(20, None);
        d.place(1005);
        assert_eq!(d.finish(), 1010);
    }
}
