//! The scoring service: hyper routes, Redis feature reads, the ONNX model and its rule-based fallback, metrics.

pub mod app;
pub mod breaker;
pub mod config;
pub mod drift;
pub mod error;
pub mod feast;
pub mod feast_init;
pub mod features;
pub mod metrics;
pub mod model;
pub mod request;
pub mod resp;
pub mod score_log;
pub mod serve;
pub mod status;
pub mod store;

pub use app::{app, App, AppState};
pub use config::{ServeArgs, ServeConfig};
pub use serve::run;
