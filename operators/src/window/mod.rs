//! Sliding windows over event time (u64 milliseconds): the per-key
//! `WindowStore` that windowed aggregates build on.

mod store;

pub use store::{
    key_hash, prefetch, FxBuildHasher, FxHasher, WindowFold, WindowStore, MAX_WINDOWS,
};
