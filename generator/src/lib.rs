//! Realistic event generator with labelled fraud patterns, to Kafka or files.
//!
//! In memory: `Generator::new(GeneratorConfig::default()).take(n)` yields a
//! deterministic stream of [`GenEvent`]s in non-decreasing event time.

pub mod cli;
pub mod output;
pub mod population;
pub mod sim;

pub use cli::{run, GenerateArgs};
pub use sim::{EventBuf, FraudKind, GenEvent, Generator, GeneratorConfig};
