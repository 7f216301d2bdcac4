//! The feature graph: config, decode, graph, worker orchestration (threads and processes), replay.
