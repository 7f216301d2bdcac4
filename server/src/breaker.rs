//! Circuit breaker in front of Redis: a run of failures opens it, so an outage
//! costs callers nothing but a 503; after a cooldown one probe is let through
//! and its outcome closes or reopens it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The breaker's state, as exported in the `breaker_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

#[derive(Debug)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is out; if it never reports (its request was cancelled), another
    /// is let through after `until`.
    HalfOpen {
        until: Instant,
    },
}

/// A consecutive-failure circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

/// What `Breaker::admit` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead.
    Yes,
    /// Go ahead: this call is the probe that decides whether to close.
    Probe,
    /// Rejected without trying.
    No,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a plain enum: a panic while holding the lock cannot leave it torn.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go to Redis now.
    pub fn admit(&self) -> Admit {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => Admit::Yes,
            Inner::Open { until } | Inner::HalfOpen { until } if Instant::now() >= until => {
                *inner = Inner::HalfOpen {
                    until: Instant::now() + self.cooldown,
                };
                Admit::Probe
            }
            Inner::Open { .. } | Inner::HalfOpen { .. } => Admit::No,
        }
    }

    /// Records a successful call; returns the state if it changed.
    pub fn success(&self) -> Option<BreakerState> {
        let mut inner = self.lock();
        let changed = !matches!(*inner, Inner::Closed { .. });
        *inner = Inner::Closed { failures: 0 };
        changed.then_some(BreakerState::Closed)
    }

    /// Records a failed call; returns the state if it changed.
    pub fn failure(&self) -> Option<BreakerState> {
        let mut inner = self.lock();
        let open = Inner::Open {
            until: Instant::now() + self.cooldown,
        };
        match *inner {
            Inner::Closed { failures } if failures + 1 >= self.threshold => {
                *inner = open;
                Some(BreakerState::Open)
            }
            Inner::Closed { failures } => {
                *inner = Inner::Closed {
                    failures: failures + 1,
                };
                None
            }
            Inner::HalfOpen { .. } => {
                *inner = open;
                Some(BreakerState::Open)
            }
            // A call admitted before the breaker opened failed late: stay open.
            Inner::Open { .. } => None,
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_failures_and_closes_after_a_good_probe() {
        let b = Breaker::new(3, Duration::from_millis(0));
        assert_eq!(b.failure(), None);
        assert_eq!(b.failure(), None);
        assert_eq!(b.success(), None, "a success resets the count");
        for _ in 0..2 {
            assert_eq!(b.failure(), None);
        }
        assert_eq!(b.failure(), Some(BreakerState::Open));
        assert_eq!(b.admit(), Admit::Probe, "cooldown of zero has passed");
        let slow = Breaker::new(1, Duration::from_secs(3600));
        slow.failure();
        assert_eq!(slow.admit(), Admit::No, "only after the cooldown");
        assert_eq!(
            b.failure(),
            Some(BreakerState::Open),
            "a failed probe reopens"
        );
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.success(), Some(BreakerState::Closed));
        assert_eq!(b.admit(), Admit::Yes);
    }

    #[test]
    fn stays_open_during_cooldown() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        assert_eq!(b.failure(), Some(BreakerState::Open));
        assert_eq!(b.admit(), Admit::No);
        assert_eq!(b.state(), BreakerState::Open);
    }
}
