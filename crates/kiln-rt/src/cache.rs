//! The state a decoder keeps between runs: the keys and values every `attention` node has
//! seen, so that a run over new tokens attends to all earlier ones without recomputing them.
//!
//! # Meaning
//!
//! Running a graph over tokens `p..p + s` with a cache holding positions `0..p` computes what
//! the same graph computes for those `s` rows when run over all `p + s` tokens at once:
//! - `rope` rotates the token at sequence index `i` by position `p + i`;
//! - `attention` prepends the cached keys, values (and key mask) to its operands, so the
//!   query at `i` sees keys `0..=p + i` under `causal` (the op's `t - s` shift), and then
//!   appends the new ones to the cache.
//!
//! Nothing else in a graph may mix positions for this to hold; every op of kiln's decoders
//! is row-wise except these two. (An output that reduces over the sequence, like a mean,
//! covers only the tokens of the run.) Numbers are the same kernels' but reductions run over other
//! shapes, so results agree with the uncached run to rounding, not bitwise.
//!
//! Keys of one head are contiguous with room to grow (`[b, heads, capacity, d]`, capacity
//! doubled when full), so a step costs its own tokens plus reading the cache, and appending
//! copies only the new rows.

use crate::kernels::{self, KeyValues};
use crate::{Tensor, Value};
use kiln_ir::NodeId;
use std::collections::HashMap;

/// Keys and values of every attention node, and how many positions they hold.
#[derive(Debug, Default)]
pub struct KvCache {
    positions: usize,
    /// Positions after the run in progress (set by its attention and rope nodes).
    pending: Option<usize>,
    batch: Option<usize>,
    layers: HashMap<NodeId, Layer>,
}

#[derive(Debug)]
struct Layer {
    heads: usize,
    d: usize,
    dv: usize,
    capacity: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[b, capacity]`, present when the node has a key mask.
    mask: Option<Vec<f32>>,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Positions held: the position of the next token.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Forgets every position (a new sequence).
    pub fn clear(&mut self) {
        *self = KvCache::default();
    }

    /// Bytes held by keys, values and masks.
    pub fn bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        self.layers.values().map(|l| (l.k.len() + l.v.len() + l.mask.as_ref().map_or(0, Vec::len)) * f).sum()
    }

    /// Runs `f` as one step over new tokens: the positions its attention and rope nodes
    /// record become part of the cache only if `f` succeeds. A failed step leaves the cache
    /// as it was; its partial writes lie past `positions` and are overwritten by the next.
    pub fn step<T, E>(&mut self, f: impl FnOnce(&mut KvCache) -> Result<T, E>) -> Result<T, E> {
        self.pending = None;
        let out = f(self)?;
        if let Some(p) = self.pending.take() {
            self.positions = p;
        }
        Ok(out)
    }

    /// Records that the run in progress covers `s` new positions per sequence; every
    /// position-dependent node must agree.
    pub fn note_positions(&mut self, s: usize) -> Result<(), String> {
        let end = self.positions + s;
        match self.pending {
            Some(p) if p != end => Err(format!(
                "this run covers {s} new positions, but another node of the same run covers {}",
                p - self.positions
            )),
            _ => {
                self.pending = Some(end);
                Ok(())
            }
        }
    }

    /// Evaluates attention node `id` over the cached keys and values followed by the new
    /// ones (`args` as the op takes them: q `[b, hq, s, d]`, k, v, optional key mask
    /// `[b, s]`), and appends the new ones to the cache.
    pub fn attention(&mut self, id: NodeId, args: &[&Value], causal: bool, scale: f32) -> Result<Tensor, String> {
        let f = |i: usize| args[i].as_f32().ok_or_else(|| format!("operand {i} must be f32"));
        let (q, k, v) = (f(0)?, f(1)?, f(2)?);
        let (b, heads, s, d, dv) = (k.shape[0], k.shape[1], k.shape[2], k.shape[3], v.shape[3]);
        match self.batch {
            Some(cached) if cached != b => {
                return Err(format!("the cache holds {cached} sequences, this run has {b}"));
            }
            _ => self.batch = Some(b),
        }
        self.note_positions(s)?;
        let start = self.positions;
        let len = start + s;
        let mask = args.get(3).map(|m| match m {
            Value::F32(t) => t.data.clone(),
            Value::I64 { data, .. } => data.iter().map(|&v| (v != 0) as u8 as f32).collect(),
        });
        let layer = self.layers.entry(id).or_insert_with(|| Layer {
            heads,
            d,
            dv,
            capacity: 0,
            k: vec![],
            v: vec![],
            mask: mask.as_ref().map(|_| vec![]),
        });
        if (layer.heads, layer.d, layer.dv) != (heads, d, dv) || layer.mask.is_some() != mask.is_some() {
            return Err("keys and values changed shape between runs".into());
        }
        if len > layer.capacity {
            layer.grow(b, start, len.max(2 * layer.capacity).max(16));
        }
        let cap = layer.capacity;
        for bh in 0..b * heads {
            layer.k[(bh * cap + start) * d..][..s * d].copy_from_slice(&k.data[bh * s * d..][..s * d]);
            layer.v[(bh * cap + start) * dv..][..s * dv].copy_from_slice(&v.data[bh * s * dv..][..s * dv]);
        }
        // The mask is passed as [b, len]: gather each sequence's valid prefix.
        let full_mask = match (&mut layer.mask, &mask) {
            (Some(cached), Some(new)) => {
                for bi in 0..b {
                    cached[bi * cap + start..][..s].copy_from_slice(&new[bi * s..][..s]);
                }
                Some((0..b).flat_map(|bi| cached[bi * cap..][..len].iter().copied()).collect::<Vec<f32>>())
            }
            _ => None,
        };
        let kv = KeyValues { k: &layer.k, v: &layer.v, heads, len, capacity: cap, d, dv };
        Ok(kernels::attention_over(q, &kv, full_mask.as_deref(), causal, scale))
    }
}

impl Layer {
    /// Re-lays the cache out with room for `capacity` positions, keeping the first `keep`.
    fn grow(&mut self, b: usize, keep: usize, capacity: usize) {
        let relayout = |old: &[f32], width: usize, rows: usize| {
            let mut new = vec![0f32; rows * capacity * width];
            for r in 0..rows {
                new[r * capacity * width..][..keep * width]
                    .copy_from_slice(&old[r * self.capacity * width..][..keep * width]);
            }
            new
        };
        self.k = relayout(&self.k, self.d, b * self.heads);
        self.v = relayout(&self.v, self.dv, b * self.heads);
        if let Some(mask) = &self.mask {
            self.mask = Some(relayout(mask, 1, b));
        }
        self.capacity = capacity;
    }
}
