//! Metrics between two dumps (SPEC "Metrics"): f64 accumulation, fixed-order reductions.
