//! Judging what a run measured against contracts (`src/contracts`).
//!
//! `runner once` hands [`Subject`]s (samples by metric name, per model × reference × mode)
//! to [`Contracts::evaluate`], which runs every contract's gates through
//! [`crate::contracts::Contract::evaluate`] and returns the verdicts as the run records them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::record::{ContractRef, StoredVerdict};
use crate::contracts::{self, Contract, Metric};

pub use crate::contracts::ContractError;

/// What one engine run measured against one reference for one model and mode.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub engine: String,
    pub model: String,
    pub reference: String,
    pub dtype: Option<String>,
    pub mode: Option<String>,
    pub samples: BTreeMap<String, Vec<f64>>,
    pub noise_floors: BTreeMap<String, f64>,
}

/// Every contract a run is judged by.
#[derive(Debug, Default)]
pub struct Contracts {
    pub contracts: Vec<Contract>,
}

impl Contracts {
    /// Reads contract files; a directory contributes its `*.yaml`/`*.yml` files, sorted.
    pub fn load(paths: &[PathBuf]) -> Result<Contracts, ContractError> {
        let mut contracts = Vec::new();
        for p in paths {
            if p.is_dir() {
                contracts.extend(Contract::load_dir(p)?);
            } else {
                contracts.push(Contract::load(p)?);
            }
        }
        Ok(Contracts { contracts })
    }

    pub fn ids(&self) -> Vec<ContractRef> {
        self.contracts.iter().map(Contract::reference).collect()
    }

    /// Every gate on every subject in its scope, contracts and gates in file order.
    pub fn evaluate(&self, subjects: &[Subject]) -> Vec<StoredVerdict> {
        let subjects: Vec<contracts::Subject> = subjects.iter().map(to_contract_subject).collect();
        let mut out = Vec::new();
        for c in &self.contracts {
            out.extend(c.evaluate(&subjects).verdicts.iter().map(StoredVerdict::from));
        }
        out
    }
}

/// Metrics the contracts module does not name (e.g. `layer.expert_set_agreement`) are left out.
fn to_contract_subject(s: &Subject) -> contracts::Subject {
    let by_metric = |m: &BTreeMap<String, Vec<f64>>| -> BTreeMap<Metric, Vec<f64>> {
        m.iter().filter_map(|(k, v)| Some((Metric::parse(k)?, v.clone()))).collect()
    };
    contracts::Subject {
        engine: s.engine.clone(),
        model: s.model.clone(),
        reference: s.reference.clone(),
        dtype: s.dtype.clone(),
        mode: s.mode.clone(),
        prompt: None,
        samples: by_metric(&s.samples),
        noise_floors: s.noise_floors.iter().filter_map(|(k, &v)| Some((Metric::parse(k)?, v))).collect(),
    }
}
