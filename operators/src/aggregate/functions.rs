//! Single-window incremental aggregates: count, sum, moments (mean and
//! population std), min, max, distinct count, mode (most frequent value),
//! last event time.
//!
//! Money is integer: sums of `i64` are kept in `i128` (sums of squares too), so
//! a retraction cancels its insertion exactly and no rounding ever drifts.

use std::collections::{BTreeMap, VecDeque};

/// An aggregate over the multiset of values in one window.
///
/// `retract` is called only for values inserted earlier, and values are
/// retracted in the order they were inserted (FIFO), as sliding windows do;
/// [`Min`] and [`Max`] rely on it. After every value has been retracted the
/// aggregate equals its `Default`.
pub trait Aggregate<V: ?Sized>: Default {
    /// What the aggregate reports.
    type Output: Clone + PartialEq;
    /// `value` entered the window.
    fn insert(&mut self, value: &V);
    /// `value` left the window.
    fn retract(&mut self, value: &V);
    /// The current result.
    fn value(&self) -> Self::Output;
}

/// Number of values.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub i64);

impl<V: ?Sized> Aggregate<V> for Count {
    type Output = i64;
    #[inline]
    fn insert(&mut self, _: &V) {
        self.0 += 1;
    }
    #[inline]
    fn retract(&mut self, _: &V) {
        self.0 -= 1;
    }
    #[inline]
    fn value(&self) -> i64 {
        self.0
    }
}

/// Exact sum of `i64` values (in `i128`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sum(pub i128);

impl Aggregate<i64> for Sum {
    type Output = i128;
    #[inline]
    fn insert(&mut self, value: &i64) {
        self.0 += *value as i128;
    }
    #[inline]
    fn retract(&mut self, value: &i64) {
        self.0 -= *value as i128;
    }
    #[inline]
    fn value(&self) -> i128 {
        self.0
    }
}

/// Count, exact sum and exact sum of squares of `i64` values: mean and
/// population standard deviation without rounding drift.
///
/// Packed to 8-byte alignment: 40 bytes instead of the 48 that `i128`'s
/// 16-byte alignment would make it, so a window store's per-key states of
/// mixed kinds (`Moments` among 32-byte deques) take 48 bytes each, not 64:
/// fewer cache lines per key visit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed(8))]
pub struct Moments {
    /// Number of values.
    pub count: i64,
    /// Sum of the values.
    pub sum: i128,
    /// Sum of the squares of the values.
    pub sum_squares: i128,
}

impl Moments {
    /// The moments of `values`, computed from scratch.
    pub fn of(values: impl IntoIterator<Item = i64>) -> Moments {
        let mut m = Moments::default();
        values.into_iter().for_each(|v| m.insert(&v));
        m
    }

    /// The mean, `None` for no values.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// The population standard deviation, `None` for no values. Computed as
    /// `sqrt(n * sum_sq - sum^2) / n` from exact integers, so identical values
    /// give exactly 0 and the result depends only on the multiset.
    pub fn population_std(&self) -> Option<f64> {
        (self.count > 0).then(|| {
            let n = self.count as i128;
            // n * sum_sq - sum^2 >= 0 by Cauchy-Schwarz; exact in i128 for
            // amounts up to ~1e12 and counts up to ~1e7.
            let spread = (n * self.sum_squares - self.sum * self.sum).max(0);
            (spread as f64).sqrt() / n as f64
        })
    }
}

impl Aggregate<i64> for Moments {
    type Output = Moments;
    #[inline]
    fn insert(&mut self, value: &i64) {
        let v = *value as i128;
        self.count += 1;
        self.sum += v;
        self.sum_squares += v * v;
    }
    #[inline]
    fn retract(&mut self, value: &i64) {
        let v = *value as i128;
        self.count -= 1;
        self.sum -= v;
        self.sum_squares -= v * v;
    }
    #[inline]
    fn value(&self) -> Moments {
        *self
    }
}

/// Maximum under FIFO retraction: a monotonic deque (amortized O(1) per
/// value). Holds the values that may still become the maximum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Max<T> {
    candidates: VecDeque<T>,
}

impl<T> Default for Max<T> {
    fn default() -> Self {
        Max {
            candidates: VecDeque::new(),
        }
    }
}

impl<T: Ord + Clone> Aggregate<T> for Max<T> {
    type Output = Option<T>;
    #[inline]
    fn insert(&mut self, value: &T) {
        // Invariant: candidates are non-increasing front to back; an older,
        // strictly smaller value can never be the maximum again.
        while self.candidates.back().is_some_and(|b| b < value) {
            self.candidates.pop_back();
        }
        self.candidates.push_back(value.clone());
    }
    #[inline]
    fn retract(&mut self, value: &T) {
        // FIFO: the oldest value leaves; it is a candidate iff it is the front.
        if self.candidates.front() == Some(value) {
            self.candidates.pop_front();
        }
    }
    #[inline]
    fn value(&self) -> Option<T> {
        self.candidates.front().cloned()
    }
}

/// Minimum under FIFO retraction (see [`Max`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Min<T> {
    candidates: VecDeque<T>,
}

impl<T> Default for Min<T> {
    fn default() -> Self {
        Min {
            candidates: VecDeque::new(),
        }
    }
}

impl<T: Ord + Clone> Aggregate<T> for Min<T> {
    type Output = Option<T>;
    #[inline]
    fn insert(&mut self, value: &T) {
        while self.candidates.back().is_some_and(|b| b > value) {
            self.candidates.pop_back();
        }
        self.candidates.push_back(value.clone());
    }
    #[inline]
    fn retract(&mut self, value: &T) {
        if self.candidates.front() == Some(value) {
            self.candidates.pop_front();
        }
    }
    #[inline]
    fn value(&self) -> Option<T> {
        self.candidates.front().cloned()
    }
}

/// The latest event time (ms) in the window: the maximum of the values, which
/// are event times.
pub type LastTime = Max<i64>;

/// Number of distinct values in the window: the multiset of [`Mode`],
/// reporting its size.
#[derive(Debug, Clone)]
pub struct DistinctCount<T>(Mode<T>);

impl<T> Default for DistinctCount<T> {
    fn default() -> Self {
        DistinctCount(Mode::default())
    }
}

impl<T: Ord + Clone> Aggregate<T> for DistinctCount<T> {
    type Output = i64;
    #[inline]
    fn insert(&mut self, value: &T) {
        self.0.insert(value);
    }
    #[inline]
    fn retract(&mut self, value: &T) {
        self.0.retract(value);
    }
    #[inline]
    fn value(&self) -> i64 {
        self.0.distinct()
    }
}

/// Multisets of at most this many distinct values stay in a sorted vector
/// (128: on the backfill of a 2-day log, where a card's merchants over 24
/// hours number in the tens, a replay took 2% less time than with 32, which
/// sent them to the map).
const SMALL_MODE: usize = 128;

/// The most frequent value (the mode) of the window, ties broken towards the
/// smallest value (`Ord`); `None` for an empty window. It keeps the multiset
/// of values, so it also reports the number of distinct values
/// ([`Mode::distinct`]) at no extra cost.
///
/// Cost: inserting and retracting are `O(log d)` to find the value (plus an
/// `O(d)` shift when a value appears or disappears while `d <= 128`), and
/// [`Aggregate::value`] is `O(d)`, `d` the number of distinct values: meant
/// for few distinct values per window (countries of a card, say).
///
/// # Examples
/// ```
/// use operators::aggregate::{Aggregate, Mode};
///
/// let mut mode = Mode::default();
/// for country in ["FR", "DE", "DE", "FR", "US"] {
///     mode.insert(&country);
/// }
/// assert_eq!(mode.value(), Some("DE")); // DE and FR tie: the smallest wins
/// assert_eq!(mode.distinct(), 3);
/// mode.retract(&"FR");
/// assert_eq!(mode.value(), Some("DE"));
/// mode.retract(&"DE");
/// assert_eq!(mode.value(), Some("DE")); // DE, FR and US tie at one
/// ```
#[derive(Debug, Clone)]
pub enum Mode<T> {
    /// At most `SMALL_MODE` distinct values with their multiplicities, sorted.
    Small(Vec<(T, u32)>),
    /// More.
    Large(BTreeMap<T, u32>),
}

impl<T> Default for Mode<T> {
    fn default() -> Self {
        Mode::Small(Vec::new())
    }
}

impl<T: Ord> Mode<T> {
    /// The most frequent value (smallest among ties), by reference.
    pub fn mode(&self) -> Option<&T> {
        // Values ascend, so keeping the first strict maximum breaks ties
        // towards the smallest value.
        fn first_max<'a, T: 'a>(it: impl Iterator<Item = (&'a T, u32)>) -> Option<&'a T> {
            let mut best: Option<(&T, u32)> = None;
            for (value, n) in it {
                if best.is_none_or(|(_, m)| n > m) {
                    best = Some((value, n));
                }
            }
            best.map(|(value, _)| value)
        }
        match self {
            Mode::Small(entries) => first_max(entries.iter().map(|(v, n)| (v, *n))),
            Mode::Large(map) => first_max(map.iter().map(|(v, n)| (v, *n))),
        }
    }

    /// Number of distinct values.
    pub fn distinct(&self) -> i64 {
        match self {
            Mode::Small(entries) => entries.len() as i64,
            Mode::Large(map) => map.len() as i64,
        }
    }
}

impl<T: Ord + Clone> Aggregate<T> for Mode<T> {
    type Output = Option<T>;
    #[inline]
    fn insert(&mut self, value: &T) {
        match self {
            Mode::Small(entries) => match entries.binary_search_by(|(v, _)| v.cmp(value)) {
                Ok(i) => entries[i].1 += 1,
                Err(i) if entries.len() < SMALL_MODE => entries.insert(i, (value.clone(), 1)),
                Err(_) => {
                    let mut map: BTreeMap<T, u32> = entries.drain(..).collect();
                    map.insert(value.clone(), 1);
                    *self = Mode::Large(map);
                }
            },
            Mode::Large(map) => {
                if let Some(n) = map.get_mut(value) {
                    *n += 1;
                } else {
                    map.insert(value.clone(), 1);
                }
            }
        }
    }
    #[inline]
    fn retract(&mut self, value: &T) {
        match self {
            Mode::Small(entries) => {
                let i = entries
                    .binary_search_by(|(v, _)| v.cmp(value))
                    .expect("retracted values were inserted");
                entries[i].1 -= 1;
                if entries[i].1 == 0 {
                    entries.remove(i);
                }
            }
            Mode::Large(map) => {
                let n = map.get_mut(value).expect("retracted values were inserted");
                *n -= 1;
                if *n == 0 {
                    map.remove(value);
                    if map.is_empty() {
                        *self = Mode::default();
                    }
                }
            }
        }
    }
    #[inline]
    fn value(&self) -> Option<T> {
        self.mode().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// Slides a window of `width` values over `values`, checking `A` against
    /// `oracle` after every insertion and retraction.
    fn slide<V: Clone, A: Aggregate<V>>(
        values: &[V],
        width: usize,
        oracle: impl Fn(&[V]) -> A::Output,
    ) -> Result<(), TestCaseError> {
        let mut agg = A::default();
        for (i, v) in values.iter().enumerate() {
            agg.insert(v);
            let lo = (i + 1).saturating_sub(width);
            if i + 1 > width {
                agg.retract(&values[lo - 1]);
            }
            prop_assert!(agg.value() == oracle(&values[lo..=i]));
        }
        for lo in values.len().saturating_sub(width)..values.len() {
            agg.retract(&values[lo]);
            prop_assert!(agg.value() == oracle(&values[lo + 1..]));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn aggregates_match_recomputation(values in proptest::collection::vec(-50i64..50, 0..80), width in 1usize..20) {
            slide::<i64, Count>(&values, width, |w| w.len() as i64)?;
            slide::<i64, Sum>(&values, width, |w| w.iter().map(|v| *v as i128).sum())?;
            slide::<i64, Moments>(&values, width, |w| Moments::of(w.iter().copied()))?;
            slide::<i64, Max<i64>>(&values, width, |w| w.iter().max().copied())?;
            slide::<i64, Min<i64>>(&values, width, |w| w.iter().min().copied())?;
            slide::<i64, DistinctCount<i64>>(&values, width, |w| w.iter().collect::<HashSet<_>>().len() as i64)?;
            slide::<i64, Mode<i64>>(&values, width, mode_of)?;
        }

        /// Few and many distinct values (past the small form and back), ties
        /// everywhere: the mode is the most frequent value, smallest on ties,
        /// and `distinct` the number of distinct values, after every step.
        #[test]
        fn mode_matches_recomputation(
            values in proptest::collection::vec(0u16..300, 0..600),
            width in 1usize..400,
        ) {
            slide::<u16, Mode<u16>>(&values, width, mode_of)?;
            let mut mode = Mode::default();
            for (i, v) in values.iter().enumerate() {
                mode.insert(v);
                let lo = (i + 1).saturating_sub(width);
                if i + 1 > width {
                    mode.retract(&values[lo - 1]);
                }
                let distinct = values[lo..=i].iter().collect::<HashSet<_>>().len() as i64;
                prop_assert_eq!(mode.distinct(), distinct);
            }
        }

        #[test]
        fn mode_of_strings_breaks_ties_lexicographically(
            values in proptest::collection::vec(proptest::sample::select(vec!["FR", "DE", "US", "GB", "A", "AB"]), 0..60),
            width in 1usize..20,
        ) {
            let values: Vec<String> = values.into_iter().map(String::from).collect();
            slide::<String, Mode<String>>(&values, width, mode_of)?;
        }

        #[test]
        fn money_retractions_cancel_exactly(values in proptest::collection::vec(-1_000_000_000_000i64..1_000_000_000_000, 1..50)) {
            let mut m = Moments::default();
            values.iter().for_each(|v| m.insert(v));
            values.iter().for_each(|v| m.retract(v));
            prop_assert_eq!(m, Moments::default());
        }

        #[test]
        fn std_of_identical_amounts_is_zero(v in -1_000_000_000_000i64..1_000_000_000_000, n in 1usize..1000) {
            let m = Moments::of(std::iter::repeat_n(v, n));
            prop_assert_eq!(m.population_std(), Some(0.0));
            prop_assert_eq!(m.mean(), Some(v as f64));
        }
    }

    /// The mode by brute force: the most frequent value, the smallest on ties.
    fn mode_of<T: Ord + Clone>(window: &[T]) -> Option<T> {
        let mut counts: BTreeMap<&T, usize> = BTreeMap::new();
        window
            .iter()
            .for_each(|v| *counts.entry(v).or_default() += 1);
        let most = counts.values().copied().max()?;
        counts
            .into_iter()
            .find(|(_, n)| *n == most)
            .map(|(v, _)| v.clone())
    }

    #[test]
    fn mode_grows_past_the_small_form_and_shrinks_back() {
        let mut m = Mode::default();
        (0..200).for_each(|v| m.insert(&v));
        m.insert(&170);
        assert!(matches!(m, Mode::Large(_)));
        assert_eq!(m.value(), Some(170));
        assert_eq!(m.distinct(), 200);
        m.retract(&170);
        assert_eq!(m.value(), Some(0));
        (0..200).for_each(|v| m.retract(&v));
        assert!(matches!(m, Mode::Small(ref e) if e.is_empty()));
        assert_eq!(m.value(), None);
    }

    #[test]
    fn distinct_count_grows_past_the_small_form_and_shrinks_back() {
        let mut d = DistinctCount::default();
        (0..140).for_each(|v| d.insert(&v));
        assert!(matches!(d.0, Mode::Large(_)));
        assert_eq!(Aggregate::<i32>::value(&d), 140);
        (0..140).for_each(|v| d.retract(&v));
        assert!(matches!(d.0, Mode::Small(ref e) if e.is_empty()));
    }

    #[test]
    fn population_std_is_exact_for_a_known_sample() {
        let m = Moments::of([2, 4, 4, 4, 5, 5, 7, 9]);
        assert_eq!(m.population_std(), Some(2.0));
        assert_eq!(m.mean(), Some(5.0));
    }
}
