//! paritybench: regression and parity benchmarking for LLM inference engines.
//!
//! One binary, `runner` (see [`cli`]). The modules follow the concerns of the product:
//! the dump [`protocol`] every engine speaks, the [`metrics`] computed between two dumps,
//! the seeded [`fixtures`] (models, prompt suites, reference dumps) and the built-in
//! [`engine`].

pub mod cli;
pub mod config;
pub mod contracts;
pub mod engine;
pub mod exec;
pub mod fixtures;
pub mod metrics;
pub mod once;
pub mod protocol;
pub mod queue;
pub mod service;
pub mod store;
