//! Realistic event generator with labelled fraud patterns, to Kafka or files.
