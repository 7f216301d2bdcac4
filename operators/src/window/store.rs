//! `WindowStore`: per-key FIFO of timed values with one cursor per sliding window.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// Receives the values entering and leaving each window of one key.
///
/// For every window `w`, values leave in the order they entered (FIFO), and a
/// value enters every window at the same time. Implementations keep whatever
/// incremental state they need (counts, sums, multisets) and must return to
/// their initial state once every value has left.
pub trait WindowFold<V> {
    /// The windows `value` takes part in, as a bit set over window indices
    /// (bit `w` = window `w`); it must include the store's widest window.
    /// A value never enters (nor leaves) the others, and costs nothing there:
    /// no departure is scheduled for it. Default: every window.
    #[inline]
    fn windows_of(&self, _value: &V) -> u32 {
        u32::MAX
    }
    /// `value` entered window `window` (an index into the store's window list).
    fn enter(&mut self, window: usize, value: &V);
    /// `value` left window `window`; it entered that window earlier.
    fn leave(&mut self, window: usize, value: &V);
    /// A hint: values will soon enter or leave `window` (`None`: any window),
    /// so the state that touches may be fetched into the cache
    /// ([`prefetch`]). The store calls it a few keys ahead of the work on
    /// them: with hundreds of thousands of keys, every key's state is a cache
    /// miss otherwise. Default: nothing.
    #[inline]
    fn prefetch(&self, _window: Option<usize>) {}
}

/// Asks the CPU to fetch the cache lines of `value` (at most the first
/// 256 bytes) without waiting for them. A hint only: it changes no state.
#[inline(always)]
pub fn prefetch<T: ?Sized>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = value as *const T as *const i8;
        let size = std::mem::size_of_val(value).min(256);
        let mut offset = 0;
        while offset < size {
            // SAFETY: a prefetch never faults and never changes memory, whatever the address.
            #[allow(unsafe_code)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset))
            };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// How many queued keys ahead of the work the store prefetches their slots
/// (their contents: half as far).
const PREFETCH_AHEAD: usize = 8;

/// A fast, deterministic (unkeyed) hasher: FxHash. Identical in every process,
/// so it can route records between workers of a cluster.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(
                chunk.try_into().expect("chunk of 8 bytes"),
            ));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // Mix the high bits down so `hash % peers` uses all of them.
        let h = self.hash;
        (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 32)
    }
}

/// `BuildHasher` for [`FxHasher`].
pub type FxBuildHasher = BuildHasherDefault<FxHasher>;

/// The FxHash of `value`: deterministic across threads and processes.
pub fn key_hash<K: Hash + ?Sized>(value: &K) -> u64 {
    let mut hasher = FxHasher::default();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Most windows a store supports.
pub const MAX_WINDOWS: usize = 8;

struct Slot<K, V, F> {
    key: Option<K>,
    /// Values in insertion (time) order; the front has absolute position `base`.
    events: VecDeque<(u64, V)>,
    base: u64,
    /// Per window: absolute position of the first value still inside it
    /// (inline: one cache line, no pointer to chase).
    cursors: [u64; MAX_WINDOWS],
    fold: F,
    touched: bool,
    /// The last insertion time and the windows whose departure is already
    /// scheduled for it (one queue entry per key, time and window).
    scheduled_time: u64,
    scheduled: u32,
}

/// Per-key sliding-window state: the values of each key inside its widest
/// window, in time order, with one cursor per window, and per-window queues of
/// the times at which values leave.
///
/// Time contract: values are inserted in non-decreasing time order (the caller
/// processes complete times in order). A value inserted at `t` is inside
/// window `w` at times `t <= s < t + windows[w]`; [`WindowStore::retract_until`]
/// with `s` removes every value with `t + windows[w] <= s`.
/// Keys whose windows are all empty are released (state freed) by
/// [`WindowStore::drain_touched`].
pub struct WindowStore<K, V, F> {
    windows: Box<[u64]>,
    /// Window indices sorted by length, shortest first.
    order: Box<[usize]>,
    widest: usize,
    slots: Vec<Slot<K, V, F>>,
    free: Vec<usize>,
    index: HashMap<K, usize, FxBuildHasher>,
    /// Per window: `(leave time, slot)`, non-decreasing in leave time. One entry
    /// per distinct insertion time of a key; entries of released slots are
    /// harmless because leaving is decided by time alone.
    due: Box<[VecDeque<(u64, usize)>]>,
    touched: Vec<usize>,
    /// Scratch: the slots of a batch being inserted.
    batch_slots: Vec<usize>,
    last_insert: u64,
    /// The fold of a key with no values, cloned for each new key.
    prototype: F,
    /// Whether departures are scheduled ([`WindowStore::new`]) or left to
    /// the caller, key by key ([`WindowStore::on_demand`]).
    scheduled: bool,
}

impl<K, V, F> WindowStore<K, V, F>
where
    K: Hash + Eq + Clone,
    F: WindowFold<V> + Clone,
{
    /// A store for the given window lengths (each positive, same unit as
    /// times); each new key starts with a clone of `prototype`.
    pub fn new(windows: &[u64], prototype: F) -> Self {
        assert!(!windows.is_empty(), "at least one window");
        assert!(windows.iter().all(|w| *w > 0), "windows must be positive");
        assert!(
            windows.len() <= MAX_WINDOWS,
            "at most {MAX_WINDOWS} windows"
        );
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&w| windows[w]);
        let widest = *order.last().expect("non-empty");
        WindowStore {
            windows: windows.into(),
            order: order.into(),
            widest,
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::default(),
            due: (0..windows.len()).map(|_| VecDeque::new()).collect(),
            touched: Vec::new(),
            batch_slots: Vec::new(),
            last_insert: 0,
            prototype,
            scheduled: true,
        }
    }

    /// A store whose departures happen key by key, when the caller asks
    /// ([`Self::retract_key`]), instead of at their times: nothing is
    /// queued per value and window, and no key is reported touched. The
    /// time order is per key (each key's values are inserted in
    /// non-decreasing time order), so the caller may visit the keys in any
    /// order. A key keeps its values until it is next retracted and
    /// released ([`Self::release_if_empty`]). For a replay that reads each
    /// key's windows only at some times, key after key.
    pub fn on_demand(windows: &[u64], prototype: F) -> Self {
        WindowStore {
            scheduled: false,
            ..WindowStore::new(windows, prototype)
        }
    }

    /// The window lengths, in the caller's order.
    pub fn windows(&self) -> &[u64] {
        &self.windows
    }

    /// Number of keys with at least one value inside a window.
    pub fn live_keys(&self) -> usize {
        self.index.len()
    }

    /// The earliest time at which some value leaves some window.
    pub fn next_due(&self) -> Option<u64> {
        self.due
            .iter()
            .filter_map(|q| q.front().map(|(t, _)| *t))
            .min()
    }

    /// Inserts `value` for `key` at `time`; it enters every window.
    pub fn insert(&mut self, time: u64, key: K, value: V) {
        let slot = self.slot_of(&key);
        self.insert_at(slot, time, value);
    }

    /// Inserts a batch of `(key, value)` at `time`, like [`Self::insert`] on
    /// each in order: keys are looked up first, then the values inserted
    /// with each key's state prefetched a few values ahead.
    pub fn insert_batch(&mut self, time: u64, batch: Vec<(K, V)>) {
        let mut slots = std::mem::take(&mut self.batch_slots);
        slots.clear();
        slots.extend(batch.iter().map(|(key, _)| self.slot_of(key)));
        for (i, (_, value)) in batch.into_iter().enumerate() {
            if let Some(&ahead) = slots.get(i + PREFETCH_AHEAD) {
                prefetch(&self.slots[ahead]);
            }
            if let Some(&ahead) = slots.get(i + PREFETCH_AHEAD / 2) {
                let s = &self.slots[ahead];
                if let Some(last) = s.events.back() {
                    prefetch(last);
                }
                s.fold.prefetch(None);
            }
            self.insert_at(slots[i], time, value);
        }
        self.batch_slots = slots;
    }

    /// The slot of `key`, occupied for it if new. A slot stays `key`'s
    /// until the key is released.
    pub fn slot_of(&mut self, key: &K) -> usize {
        // Written out rather than through `slot_for`: the stream graph
        // bench ran 276-282k events/s on 2 workers that way, 337-355k so.
        match self.index.get(key) {
            Some(&slot) => slot,
            None => self.occupy(key.clone()),
        }
    }

    /// [`Self::slot_of`] by a borrowed form of the key; `own` makes the
    /// key stored for a new one.
    #[inline]
    pub fn slot_for<Q>(&mut self, key: &Q, own: impl FnOnce(&Q) -> K) -> usize
    where
        Q: ?Sized + Hash + Eq,
        K: Borrow<Q>,
    {
        match self.index.get(key) {
            Some(&slot) => slot,
            None => self.occupy(own(key)),
        }
    }

    fn occupy(&mut self, key: K) -> usize {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot {
                    key: None,
                    events: VecDeque::new(),
                    base: 0,
                    cursors: [0; MAX_WINDOWS],
                    fold: self.prototype.clone(),
                    touched: false,
                    scheduled_time: 0,
                    scheduled: 0,
                });
                self.slots.len() - 1
            }
        };
        self.index.insert(key.clone(), slot);
        self.slots[slot].key = Some(key);
        slot
    }

    fn insert_at(&mut self, slot: usize, time: u64, value: V) {
        debug_assert!(
            !self.scheduled || time >= self.last_insert,
            "insertions must be in time order"
        );
        self.last_insert = time;
        let windows = self.windows.len();
        let s = &mut self.slots[slot];
        debug_assert!(
            s.events.back().is_none_or(|(t, _)| *t <= time),
            "a key's insertions must be in time order"
        );
        let all = (1u32 << windows) - 1;
        let member = s.fold.windows_of(&value) & all;
        debug_assert!(
            member & (1 << self.widest) != 0,
            "every value takes part in the widest window"
        );
        for w in 0..windows {
            if member & (1 << w) != 0 {
                s.fold.enter(w, &value);
            }
        }
        s.events.push_back((time, value));
        if !self.scheduled {
            return;
        }
        if s.scheduled_time != time {
            s.scheduled_time = time;
            s.scheduled = 0;
        }
        let mut new = member & !s.scheduled;
        s.scheduled |= new;
        while new != 0 {
            let w = new.trailing_zeros() as usize;
            new &= new - 1;
            self.due[w].push_back((time + self.windows[w], slot));
        }
        if !s.touched {
            s.touched = true;
            self.touched.push(slot);
        }
    }

    /// Inserts `value` at `time` into `slot` ([`Self::slot_of`]) of an
    /// [`on_demand`](Self::on_demand) store; `time` is at least the key's
    /// last insertion time.
    pub fn insert_into(&mut self, slot: usize, time: u64, value: V) {
        debug_assert!(!self.scheduled, "on-demand stores only");
        self.insert_at(slot, time, value);
    }

    /// Removes the values of `slot` from the windows they have left by
    /// `time` (those with `t + window <= time`), whatever the other keys'
    /// times. Returns the number of departures.
    pub fn retract_key(&mut self, slot: usize, time: u64) -> usize {
        debug_assert!(!self.scheduled, "on-demand stores only");
        let mut work = 0;
        // Shortest windows first, as in `retract_until`.
        for i in 0..self.order.len() {
            work += self.advance(slot, self.order[i], time);
        }
        work
    }

    /// The key and fold of an occupied `slot`, or `None` when its windows
    /// are all empty.
    pub fn at(&self, slot: usize) -> Option<(&K, &F)> {
        let s = &self.slots[slot];
        if s.events.is_empty() {
            return None;
        }
        Some((s.key.as_ref().expect("occupied"), &s.fold))
    }

    /// Releases `slot` if its windows are all empty; returns whether it did.
    pub fn release_if_empty(&mut self, slot: usize) -> bool {
        let empty = self.slots[slot].events.is_empty();
        if empty {
            self.release(slot);
        }
        empty
    }

    /// Forgets the key of an empty `slot` and frees its memory: a fresh
    /// deque and fold.
    fn release(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        let key = s.key.take().expect("occupied");
        self.index.remove(&key);
        s.events = VecDeque::new();
        s.fold = self.prototype.clone();
        s.base = 0;
        s.cursors.iter_mut().for_each(|c| *c = 0);
        s.scheduled = 0;
        self.free.push(slot);
    }

    /// Removes values from windows they have left by `time` (those with
    /// `t + window <= time`), doing at most about `budget` units of work.
    /// Returns the work done; all due work is done when it is below `budget`.
    pub fn retract_until(&mut self, time: u64, budget: usize) -> usize {
        let mut work = 0;
        // Shortest windows first: a value leaves the widest window last, so
        // when it is dropped from the FIFO it has left every other window.
        for i in 0..self.order.len() {
            let w = self.order[i];
            while let Some(&(due, slot)) = self.due[w].front() {
                if due > time || work >= budget {
                    break;
                }
                self.prefetch_due(w, time);
                self.due[w].pop_front();
                work += 1 + self.advance(slot, w, time);
            }
        }
        work
    }

    /// Prefetches for the departures a few entries down window `w`'s queue:
    /// the slot far ahead, the values and fold state of a nearer one (whose
    /// slot was prefetched earlier).
    #[inline]
    fn prefetch_due(&self, w: usize, time: u64) {
        let queue = &self.due[w];
        if let Some(&(due, slot)) = queue.get(PREFETCH_AHEAD) {
            if due <= time {
                prefetch(&self.slots[slot]);
            }
        }
        if let Some(&(due, slot)) = queue.get(PREFETCH_AHEAD / 2) {
            let s = &self.slots[slot];
            if due <= time && s.key.is_some() {
                if let Some(value) = s.events.get(s.cursors[w].saturating_sub(s.base) as usize) {
                    prefetch(value);
                }
                s.fold.prefetch(Some(w));
            }
        }
    }

    fn advance(&mut self, slot: usize, w: usize, time: u64) -> usize {
        let window = self.windows[w];
        let windows = self.windows.len();
        let s = &mut self.slots[slot];
        let mut left = 0;
        let end = s.base + s.events.len() as u64;
        while s.cursors[w] < end {
            let (t, value) = &s.events[(s.cursors[w] - s.base) as usize];
            if t + window > time {
                break;
            }
            // Values not in window `w` never entered it: skip them.
            if s.fold.windows_of(value) & (1 << w) != 0 {
                s.fold.leave(w, value);
                left += 1;
            }
            s.cursors[w] += 1;
        }
        if w == self.widest {
            while s.base < s.cursors[w] {
                s.events.pop_front();
                s.base += 1;
            }
            // Shorter windows have already passed every value of theirs that
            // left the widest one (departures are processed shortest window
            // first); a cursor still behind `base` only lags over values not
            // in its window.
            for c in &mut s.cursors[..windows] {
                *c = (*c).max(s.base);
            }
        }
        if left > 0 && self.scheduled && !s.touched {
            s.touched = true;
            self.touched.push(slot);
        }
        left
    }

    /// Calls `each(key, fold, empty)` for every key whose windows changed since
    /// the last call, then releases the keys whose windows are all empty.
    pub fn drain_touched(&mut self, mut each: impl FnMut(&K, &mut F, bool)) {
        let touched = std::mem::take(&mut self.touched);
        for (i, &slot) in touched.iter().enumerate() {
            if let Some(&ahead) = touched.get(i + PREFETCH_AHEAD) {
                prefetch(&self.slots[ahead]);
            }
            if let Some(&ahead) = touched.get(i + PREFETCH_AHEAD / 2) {
                self.slots[ahead].fold.prefetch(None);
            }
            let s = &mut self.slots[slot];
            s.touched = false;
            let key = s.key.as_ref().expect("touched slots are occupied");
            let empty = s.events.is_empty();
            each(key, &mut s.fold, empty);
            if empty {
                self.release(slot);
            }
        }
        self.touched = touched;
        self.touched.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Clone)]
    struct Counts([i64; 2]);
    impl WindowFold<u32> for Counts {
        fn enter(&mut self, w: usize, _: &u32) {
            self.0[w] += 1;
        }
        fn leave(&mut self, w: usize, _: &u32) {
            self.0[w] -= 1;
        }
    }

    fn drain(
        store: &mut WindowStore<&'static str, u32, Counts>,
    ) -> Vec<(&'static str, [i64; 2], bool)> {
        let mut out = Vec::new();
        store.drain_touched(|k, f, empty| out.push((*k, f.0, empty)));
        out.sort();
        out
    }

    #[test]
    fn values_leave_each_window_at_t_plus_w_and_idle_keys_are_freed() {
        let mut store = WindowStore::<&str, u32, Counts>::new(&[10, 5], Counts::default());
        store.insert(0, "a", 1);
        store.insert(0, "a", 2);
        store.insert(3, "b", 3);
        assert_eq!(
            drain(&mut store),
            vec![("a", [2, 2], false), ("b", [1, 1], false)]
        );
        assert_eq!(store.next_due(), Some(5));
        store.retract_until(4, usize::MAX);
        assert_eq!(drain(&mut store), vec![]);
        store.retract_until(5, usize::MAX);
        assert_eq!(drain(&mut store), vec![("a", [2, 0], false)]);
        store.retract_until(10, usize::MAX);
        assert_eq!(
            drain(&mut store),
            vec![("a", [0, 0], true), ("b", [1, 0], false)]
        );
        assert_eq!(store.live_keys(), 1);
        store.insert(12, "c", 4);
        store.retract_until(13, usize::MAX);
        assert_eq!(
            drain(&mut store),
            vec![("b", [0, 0], true), ("c", [1, 1], false)]
        );
        assert_eq!(store.live_keys(), 1);
    }

    /// A deterministic generator of numbers below `n` (an LCG from `seed`).
    fn below(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut state = seed;
        move |n| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        }
    }

    /// A fold whose values say which windows they take part in.
    #[derive(Default, Clone)]
    struct Masked([i64; 3]);
    impl WindowFold<u32> for Masked {
        fn windows_of(&self, value: &u32) -> u32 {
            *value | 0b100
        }
        fn enter(&mut self, w: usize, v: &u32) {
            assert!(self.windows_of(v) & (1 << w) != 0);
            self.0[w] += 1;
        }
        fn leave(&mut self, w: usize, v: &u32) {
            assert!(self.windows_of(v) & (1 << w) != 0);
            self.0[w] -= 1;
        }
    }

    /// Values in a subset of the windows (always the widest): counts match a
    /// brute-force recount at every time, with any budget, and keys are
    /// released once their widest window empties.
    #[test]
    fn values_outside_some_windows_never_enter_nor_leave_them() {
        let windows = [3u64, 7, 20];
        for budget in [1usize, 2, 5, usize::MAX] {
            let mut next = below(12345);
            let mut store = WindowStore::<u8, u32, Masked>::new(&windows, Masked::default());
            let mut log: Vec<(u64, u8, u32)> = Vec::new();
            let mut rows: std::collections::BTreeMap<u8, [i64; 3]> = Default::default();
            for time in 0..120u64 {
                while store.next_due().is_some_and(|d| d <= time) {
                    store.retract_until(time, budget);
                }
                if time < 60 {
                    for _ in 0..next(4) {
                        let (key, mask) = (next(3) as u8, next(4) as u32);
                        store.insert(time, key, mask);
                        log.push((time, key, mask));
                    }
                }
                store.drain_touched(|k, f, empty| {
                    if empty {
                        assert_eq!(f.0, [0; 3]);
                        rows.remove(k);
                    } else {
                        rows.insert(*k, f.0);
                    }
                });
                let mut expected: std::collections::BTreeMap<u8, [i64; 3]> = Default::default();
                for &(t, key, mask) in &log {
                    for (w, len) in windows.iter().enumerate() {
                        if (mask | 0b100) & (1 << w) != 0 && t <= time && time < t + len {
                            expected.entry(key).or_default()[w] += 1;
                        }
                    }
                }
                assert_eq!(rows, expected, "time {time}, budget {budget}");
                assert_eq!(store.live_keys(), expected.len());
            }
        }
    }

    /// On demand, keys are visited in any order, each at its own pace:
    /// after `retract_key(slot, s)` a key's counts are those of a brute-force
    /// recount at `s`, no key is ever reported touched, and a key is
    /// released only when asked and empty.
    #[test]
    fn on_demand_departures_are_per_key_and_keys_are_released_when_asked() {
        let windows = [3u64, 7, 20];
        let mut store = WindowStore::<u8, u32, Masked>::on_demand(&windows, Masked::default());
        let mut next = below(99);
        // Per key: its own clock and the values inserted, (time, mask).
        let mut clocks = [0u64; 4];
        let mut log: [Vec<(u64, u32)>; 4] = Default::default();
        let mut released = 0;
        for _ in 0..2_000 {
            let key = next(4) as usize;
            // Mostly small steps; sometimes past the widest window.
            clocks[key] += if next(10) == 0 { 25 } else { next(3) };
            let now = clocks[key];
            let slot = store.slot_of(&(key as u8));
            store.retract_key(slot, now);
            let mut expected = [0i64; 3];
            for &(t, mask) in &log[key] {
                for (w, len) in windows.iter().enumerate() {
                    if (mask | 0b100) & (1 << w) != 0 && now < t + len {
                        expected[w] += 1;
                    }
                }
            }
            let found = store.at(slot).map(|(k, fold)| (*k, fold.0));
            let live = expected.iter().any(|c| *c > 0);
            assert_eq!(
                found,
                live.then_some((key as u8, expected)),
                "key {key} at {now}"
            );
            if next(3) == 0 {
                let mask = next(4) as u32;
                store.insert_into(slot, now, mask);
                log[key].push((now, mask));
            } else if store.release_if_empty(slot) {
                assert!(!live, "only empty keys are released");
                log[key].clear();
                released += 1;
            }
            assert!(store.touched.is_empty() && store.due.iter().all(|q| q.is_empty()));
        }
        assert!(released > 20, "only {released} releases");
    }
}
