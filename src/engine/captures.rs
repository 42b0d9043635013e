//! Which activations to record, and where they go while a prompt runs.
//!
//! A [`CapturePlan`] is resolved once per request against the model (points the model
//! cannot provide are listed as absent, never faked). The forward pass asks
//! [`CapturePlan::wants`] at each point — a bool test, so captures cost nothing when not
//! requested — and copies the requested rows into a [`CaptureSink`], which concatenates
//! them across forward calls (one call in prefill mode, one per token in incremental mode)
//! into the `[P, ·]` tensors of the shard.

use std::collections::BTreeMap;

use crate::protocol::{CapturePoint, CaptureSpec, Tensor};

use super::config::ModelConfig;

/// The capture points and layers a request asked for, resolved against the model.
#[derive(Debug, Clone, Default)]
pub struct CapturePlan {
    /// Indexed by `CapturePoint as usize`.
    points: [bool; CapturePoint::ALL.len()],
    /// `[n_layers]`
    layers: Vec<bool>,
}

impl CapturePlan {
    /// Records nothing.
    pub fn none() -> CapturePlan {
        CapturePlan::default()
    }

    /// Resolves a request's capture spec. Returns the plan, the points it will record, the
    /// layers, and the requested points the model cannot provide (with why).
    pub fn resolve(
        spec: &CaptureSpec,
        config: &ModelConfig,
    ) -> (CapturePlan, Vec<CapturePoint>, Vec<u32>, BTreeMap<String, String>) {
        let layer_list = spec.layers.resolve(config.n_layers);
        let mut layers = vec![false; config.n_layers];
        for &l in &layer_list {
            layers[l as usize] = true;
        }
        let has_moe = (0..config.n_layers).any(|i| config.is_sparse_layer(i));
        let mut plan = CapturePlan { points: [false; CapturePoint::ALL.len()], layers };
        let mut recorded = Vec::new();
        let mut absent = BTreeMap::new();
        for &p in &spec.points {
            if p.is_moe() && !has_moe {
                absent.insert(p.as_str().to_string(), format!("{} has no MoE layers", config.architecture));
                continue;
            }
            if !plan.points[p as usize] {
                plan.points[p as usize] = true;
                recorded.push(p);
            }
        }
        (plan, recorded, layer_list, absent)
    }

    /// Whether `point` is recorded at `layer` (global points: at layer 0, whatever the
    /// layer selection; the model only asks for MoE points on sparse layers).
    #[inline]
    pub fn wants(&self, point: CapturePoint, layer: usize) -> bool {
        if !self.points[point as usize] {
            return false;
        }
        if point.is_global() {
            return layer == 0;
        }
        self.layers.get(layer).copied().unwrap_or(false)
    }

    pub fn is_empty(&self) -> bool {
        !self.points.iter().any(|&p| p)
    }
}

/// Rows of one capture, appended call by call.
#[derive(Debug, Clone)]
enum Rows {
    F32 { width: usize, data: Vec<f32> },
    I32 { width: usize, data: Vec<i32> },
}

/// Captured rows of one prompt, keyed by tensor name `hidden.{point}.{layer}`.
#[derive(Debug, Default)]
pub struct CaptureSink {
    rows: BTreeMap<String, Rows>,
}

impl CaptureSink {
    pub fn new() -> CaptureSink {
        CaptureSink::default()
    }

    pub fn clear(&mut self) {
        self.rows.clear();
    }

    /// Appends rows `rows` of `buf` (`[t, width]`).
    pub fn push_f32(&mut self, point: CapturePoint, layer: usize, buf: &[f32], width: usize, rows: &[usize]) {
        let entry =
            self.rows.entry(point.tensor_name(layer as u32)).or_insert_with(|| Rows::F32 { width, data: Vec::new() });
        if let Rows::F32 { data, .. } = entry {
            for &r in rows {
                data.extend_from_slice(&buf[r * width..(r + 1) * width]);
            }
        }
    }

    /// Appends rows `rows` of `buf` (`[t, width]`), integer captures (`moe_topk_ids`).
    pub fn push_i32(&mut self, point: CapturePoint, layer: usize, buf: &[i32], width: usize, rows: &[usize]) {
        let entry =
            self.rows.entry(point.tensor_name(layer as u32)).or_insert_with(|| Rows::I32 { width, data: Vec::new() });
        if let Rows::I32 { data, .. } = entry {
            for &r in rows {
                data.extend_from_slice(&buf[r * width..(r + 1) * width]);
            }
        }
    }

    /// The captures as `[rows, width]` tensors.
    pub fn take(&mut self) -> BTreeMap<String, Tensor> {
        std::mem::take(&mut self.rows)
            .into_iter()
            .map(|(name, r)| {
                let t = match r {
                    Rows::F32 { width, data } => Tensor::f32(vec![data.len() / width, width], data),
                    Rows::I32 { width, data } => Tensor::i32(vec![data.len() / width, width], data),
                };
                (name, t)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{Architecture, ModelConfig};
    use crate::protocol::Layers;
    use std::path::Path;

    #[test]
    fn resolves_points_layers_and_absent_ones() {
        let c = ModelConfig::new(Path::new("x"), Architecture::Qwen3, 10, 8, 8, 3, 2, 1, None, 1e-6, 1e6, true, None)
            .unwrap();
        let spec = CaptureSpec {
            points: vec![CapturePoint::Embed, CapturePoint::LayerOut, CapturePoint::MoeRouter],
            layers: Layers::List(vec![2]),
        };
        let (plan, points, layers, absent) = CapturePlan::resolve(&spec, &c);
        assert_eq!(points, vec![CapturePoint::Embed, CapturePoint::LayerOut]);
        assert_eq!(layers, vec![2]);
        assert!(absent["moe_router"].contains("no MoE layers"));
        assert!(plan.wants(CapturePoint::Embed, 0) && !plan.wants(CapturePoint::Embed, 2));
        assert!(plan.wants(CapturePoint::LayerOut, 2) && !plan.wants(CapturePoint::LayerOut, 0));
        assert!(!plan.wants(CapturePoint::AttnOut, 2));
    }

    #[test]
    fn sink_concatenates_rows_across_calls() {
        let mut s = CaptureSink::new();
        s.push_f32(CapturePoint::AttnOut, 1, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, &[0, 2]);
        s.push_f32(CapturePoint::AttnOut, 1, &[7.0, 8.0], 2, &[0]);
        s.push_i32(CapturePoint::MoeTopkIds, 1, &[3, 1], 2, &[0]);
        let t = s.take();
        assert_eq!(t["hidden.attn_out.1"], Tensor::f32(vec![3, 2], vec![1.0, 2.0, 5.0, 6.0, 7.0, 8.0]));
        assert_eq!(t["hidden.moe_topk_ids.1"], Tensor::i32(vec![1, 2], vec![3, 1]));
    }
}
