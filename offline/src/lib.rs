//! Offline: the training sets, backfilled from the event log by the same
//! differential-dataflow feature graph the stream job runs, joined point in
//! time with each transaction and product view, written as Parquet.

pub mod asof;
pub mod backfill;
pub mod cli;
#[cfg(test)]
mod fixtures;
pub mod keys;
pub mod log;
pub mod output;
pub mod parity;

pub use backfill::{BackfillConfig, Summary};
