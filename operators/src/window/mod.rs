//! Sliding windows over event time (u64 milliseconds): the `SlidingWindow`
//! operator and the per-key `WindowStore` that windowed aggregates build on.

mod store;

pub use store::{key_hash, FxBuildHasher, FxHasher, WindowFold, WindowStore, MAX_WINDOWS};

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;

/// Turns a stream of events into the updates of a sliding window over them.
pub trait SlidingWindow<'scope, D> {
    /// Emits each record `d` received at time `t` as `(d, +1)` at `t` and
    /// `(d, -1)` at `t + window`: the accumulated updates at time `s` are the
    /// records with `s - window < t <= s`.
    ///
    /// Time contract: only advances times (by exactly `window`); emits at `t`
    /// and `t + window`, holding no capability beyond the input's, so the
    /// retraction is sent at once and progress is never held back. The output
    /// is the update stream of a differential collection (`(data, diff)` at a
    /// time). `window` must be positive. The operator is named "SlidingWindow".
    ///
    /// # Examples
    /// ```
    /// use timely::dataflow::operators::{Capture, Input};
    /// use timely::dataflow::operators::capture::Extract;
    /// use operators::window::SlidingWindow;
    ///
    /// let captured = timely::execute_directly(|worker| {
    ///     let (mut input, captured) = worker.dataflow::<u64, _, _>(|scope| {
    ///         let (input, stream) = scope.new_input::<Vec<char>>();
    ///         (input, stream.sliding_window(10).capture())
    ///     });
    ///     input.send('a');
    ///     input.advance_to(7);
    ///     input.send('b');
    ///     captured
    /// });
    /// // Each record enters at its time and leaves ten ticks later.
    /// assert_eq!(
    ///     captured.extract(),
    ///     vec![
    ///         (0, vec![('a', 1)]),
    ///         (7, vec![('b', 1)]),
    ///         (10, vec![('a', -1)]),
    ///         (17, vec![('b', -1)]),
    ///     ]
    /// );
    /// ```
    fn sliding_window(self, window: u64) -> StreamVec<'scope, u64, (D, i64)>;
}

impl<'scope, D: Clone + 'static> SlidingWindow<'scope, D> for StreamVec<'scope, u64, D> {
    fn sliding_window(self, window: u64) -> StreamVec<'scope, u64, (D, i64)> {
        assert!(window > 0, "window must be positive");
        self.unary(Pipeline, "SlidingWindow", move |_cap, _info| {
            move |input, output| {
                input.for_each(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    let port = output.output_index();
                    let later = cap.delayed(&(time + window), port);
                    output
                        .session(&later)
                        .give_iterator(data.iter().map(|d| (d.clone(), -1)));
                    output
                        .session(&cap)
                        .give_iterator(data.drain(..).map(|d| (d, 1)));
                });
            }
        })
    }
}
