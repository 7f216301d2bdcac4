//! Feature freshness: Kafka append time to Redis visibility, per record.
//!
//! The source records `(dataflow time, append time)` of each record it
//! emits into [`AppendTimes`]; a record is visible once the acknowledgement
//! frontier of every worker's sink has passed its time (its row change was
//! written in a batch for a frontier past it).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use prometheus_client::metrics::histogram::Histogram;

/// Append times of the records read by one worker, by dataflow time.
#[derive(Debug, Clone, Default)]
pub struct AppendTimes {
    inner: Rc<RefCell<BTreeMap<u64, Vec<i64>>>>,
}

impl AppendTimes {
    /// Notes a record at dataflow `time` appended to Kafka at `append_ms`.
    pub fn record(&self, time: u64, append_ms: i64) {
        let mut inner = self.inner.borrow_mut();
        // Most records land at the latest time: skip the tree search.
        if let Some(mut last) = inner.last_entry() {
            if *last.key() == time {
                last.get_mut().push(append_ms);
                return;
            }
        }
        inner.entry(time).or_default().push(append_ms);
    }

    /// Observes every record before `frontier` as visible at `now_ms`.
    pub fn visible(&self, frontier: u64, now_ms: i64, histogram: &Histogram) {
        let mut inner = self.inner.borrow_mut();
        let later = inner.split_off(&frontier);
        for appends in std::mem::replace(&mut *inner, later).into_values() {
            for append in appends {
                histogram.observe((now_ms - append).max(0) as f64 / 1000.0);
            }
        }
    }

    /// Records not yet visible.
    pub fn pending(&self) -> usize {
        self.inner.borrow().values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_visible_when_the_frontier_passes_their_time() {
        let times = AppendTimes::default();
        let histogram = Histogram::new([0.5, 1.0, 2.0]);
        times.record(10, 1_000);
        times.record(20, 1_500);
        times.visible(20, 2_000, &histogram);
        assert_eq!(times.pending(), 1);
        times.visible(21, 2_000, &histogram);
        assert_eq!(times.pending(), 0);
    }
}
