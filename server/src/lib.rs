//! The scoring service: hyper routes, Redis feature reads, the ONNX model and its rule-based fallback, metrics.
