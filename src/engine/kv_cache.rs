//! The key/value cache: every layer's rotated keys and values of the positions seen so far.
//!
//! Allocated once per prompt for the whole sequence (prompt plus decode steps), so nothing
//! is reallocated while tokens stream through it. A forward pass writes its rows at
//! positions `len()..len() + t` of every layer, then [`KvCache::advance`] commits them.

/// Why the cache cannot take more tokens.
#[derive(Debug, thiserror::Error)]
#[error("the KV cache holds {capacity} positions; {len} are used and {wanted} more were asked for")]
pub struct CacheFull {
    pub capacity: usize,
    pub len: usize,
    pub wanted: usize,
}

pub struct KvCache {
    n_layers: usize,
    capacity: usize,
    kv_dim: usize,
    len: usize,
    /// `[n_layers, capacity, n_kv_heads * head_dim]`
    k: Vec<f32>,
    /// `[n_layers, capacity, n_kv_heads * head_dim]`
    v: Vec<f32>,
}

impl KvCache {
    pub fn new(n_layers: usize, capacity: usize, kv_dim: usize) -> KvCache {
        let size = n_layers * capacity * kv_dim;
        KvCache { n_layers, capacity, kv_dim, len: 0, k: vec![0.0; size], v: vec![0.0; size] }
    }

    /// Positions committed so far (the absolute position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Checks that `t` more positions fit.
    pub fn reserve(&self, t: usize) -> Result<(), CacheFull> {
        if self.len + t > self.capacity {
            return Err(CacheFull { capacity: self.capacity, len: self.len, wanted: t });
        }
        Ok(())
    }

    /// Layer `layer`'s keys and values, `[capacity, kv_dim]` each. Rows `len()..` are free
    /// for the current forward pass.
    pub fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        debug_assert!(layer < self.n_layers);
        let size = self.capacity * self.kv_dim;
        let r = layer * size..(layer + 1) * size;
        (&mut self.k[r.clone()], &mut self.v[r])
    }

    /// Commits `t` positions written by the forward pass.
    pub fn advance(&mut self, t: usize) -> Result<(), CacheFull> {
        self.reserve(t)?;
        self.len += t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_disjoint_and_capacity_is_enforced() {
        let mut c = KvCache::new(2, 3, 4);
        c.layer_mut(1).0[0] = 7.0;
        assert_eq!(c.layer_mut(0).0[0], 0.0);
        assert_eq!(c.layer_mut(1).0.len(), 12);
        c.advance(2).unwrap();
        let e = c.advance(2).unwrap_err().to_string();
        assert!(e.contains("3 positions") && e.contains("2 are used"), "{e}");
        c.clear();
        assert!(c.is_empty());
    }
}
