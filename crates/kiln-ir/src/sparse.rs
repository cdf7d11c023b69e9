//! Sparse weights: which values of a matrix are stored, and where.
//!
//! A sparse weight `W: f32[rows, cols]` has the pattern `n:m`: in every *group* of `m`
//! consecutive values along a row (columns `g m .. (g + 1) m`), at most `n` are stored and
//! the others are zero. It is stored as two tensors of the [`crate::TensorStore`]:
//!
//! - **values**, `[rows, cols / m * n]` in any value [`Format`]: group `g` of a row owns the
//!   `n` slots `g n .. (g + 1) n` of that row, filled in column order;
//! - **mask**, `u8[rows, cols / 8]`: bit `c % 8` (least significant first) of byte `c / 8` of
//!   row `r` is set when `W[r, c]` is stored. At most `n` bits of a group are set.
//!
//! **Meaning** ([`densify`]): `W[r, c]` is `values[r, g n + j]` when bit `c` is set and is the
//! `j`-th set bit of its group `g` (counting from 0), and 0 otherwise. A group with fewer
//! than `n` set bits leaves its last slots unread; [`pack`] writes zeros there.
//!
//! `2:4` and `4:8` are semi-structured sparsity; `m = cols` is unstructured sparsity with at
//! most `n` values per row (rows pad to the same number of slots, so the values stay a
//! row-major matrix whose rows a kernel can split between threads).
//!
//! **Why one bitmask for every pattern.** It costs one bit per weight. Positions cost
//! `n log2(m) / m` bits: the same for 2:4, more for 4:8 (1.5), and far more for unstructured
//! patterns. A kernel that wants positions derives them from the mask when the engine is
//! built. A weight is `n / m * bits(values) + 1` bits per weight: 2:4 over int4g32 (4.5
//! bits) is 3.25.
//!
//! **Constraints** ([`Sparse::check`]): `1 <= n < m`, `m` divides `cols`, 8 divides `cols`,
//! and the block of the values' format divides `cols / m * n` (the verifier checks this
//! one).

use crate::format::Format;
use std::fmt;

/// The sparse layout of a `weight` node: its pattern and the store tensor of its mask. The
/// node's [`crate::WeightRef::tensor`] names the values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sparse {
    /// At most `n` of every `m` consecutive values along a row are stored.
    pub n: u64,
    pub m: u64,
    /// Name of the mask tensor in the store (`u8[rows, cols / 8]`).
    pub mask: String,
    /// FNV-1a hash of the mask's bytes, when the graph is bound to a checkpoint.
    pub mask_checksum: Option<u64>,
}

/// A sparse pattern that cannot hold, or stored data that breaks one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SparseError {
    #[error("sparsity {n}:{m} over rows of {cols}: {why}")]
    Pattern { n: u64, m: u64, cols: u64, why: &'static str },
    #[error("row {row}, columns {start}..{end}: {found} values are stored where {n}:{m} allows {n}")]
    Group { row: u64, start: u64, end: u64, found: u32, n: u64, m: u64 },
    #[error("the sparse {what} of a [{rows}, {cols}] weight must hold {expected} elements, found {found}")]
    Size { what: &'static str, rows: u64, cols: u64, expected: u64, found: u64 },
}

impl Sparse {
    /// Checks the pattern `n:m` against rows of `cols` values (see the module docs).
    pub fn check(n: u64, m: u64, cols: u64) -> Result<(), SparseError> {
        let bad = |why| Err(SparseError::Pattern { n, m, cols, why });
        if n == 0 || n >= m {
            return bad("n must be at least 1 and less than m");
        }
        if cols == 0 || !cols.is_multiple_of(m) {
            return bad("m must divide the row");
        }
        if !cols.is_multiple_of(8) {
            return bad("the row must be a multiple of 8 (the mask stores whole bytes)");
        }
        Ok(())
    }

    /// The pattern as printed: `2:4`.
    pub fn pattern(&self) -> String {
        format!("{}:{}", self.n, self.m)
    }

    /// Shape of the values tensor of a `[rows, cols]` weight.
    pub fn values_shape(&self, rows: u64, cols: u64) -> Vec<u64> {
        vec![rows, cols / self.m * self.n]
    }

    /// Shape of the mask tensor of a `[rows, cols]` weight.
    pub fn mask_shape(rows: u64, cols: u64) -> Vec<u64> {
        vec![rows, cols / 8]
    }

    /// Storage bits per weight with values in `format`, the mask included.
    pub fn bits_per_weight(&self, format: Format) -> f64 {
        self.n as f64 / self.m as f64 * format.bits_per_weight() + 1.0
    }
}

impl fmt::Display for Sparse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern())
    }
}

/// The dense `[rows, cols]` value of a sparse weight of pattern `n:m` (see the module docs).
/// This function *is* the meaning of a sparse weight. Errors if a size is wrong or a group
/// has more than `n` bits set.
pub fn densify(n: u64, m: u64, rows: u64, cols: u64, values: &[f32], mask: &[u8]) -> Result<Vec<f32>, SparseError> {
    Sparse::check(n, m, cols)?;
    let slots = cols / m * n;
    let size = |what, expected: u64, found: usize| {
        if found as u64 == expected {
            Ok(())
        } else {
            Err(SparseError::Size { what, rows, cols, expected, found: found as u64 })
        }
    };
    size("values", rows * slots, values.len())?;
    size("mask", rows * cols / 8, mask.len())?;
    let mut out = vec![0f32; (rows * cols) as usize];
    for r in 0..rows {
        let bits = &mask[(r * cols / 8) as usize..][..(cols / 8) as usize];
        let row_values = &values[(r * slots) as usize..][..slots as usize];
        let row_out = &mut out[(r * cols) as usize..][..cols as usize];
        for g in 0..cols / m {
            let mut j = 0;
            for c in g * m..(g + 1) * m {
                if bits[(c / 8) as usize] >> (c % 8) & 1 == 1 {
                    if j == n {
                        let found =
                            (g * m..(g + 1) * m).filter(|&c| bits[(c / 8) as usize] >> (c % 8) & 1 == 1).count();
                        let (start, end) = (g * m, (g + 1) * m);
                        return Err(SparseError::Group { row: r, start, end, found: found as u32, n, m });
                    }
                    row_out[c as usize] = row_values[(g * n + j) as usize];
                    j += 1;
                }
            }
        }
    }
    Ok(out)
}

/// Splits a dense `[rows, cols]` matrix into the values and mask of pattern `n:m`, storing
/// the entries where `keep` is true (in column order, zeros in unused slots). The inverse of
/// [`densify`]: `densify(pack(w, keep))` is `w` where `keep` holds and 0 elsewhere. Errors if
/// a group keeps more than `n` entries.
pub fn pack(
    n: u64,
    m: u64,
    rows: u64,
    cols: u64,
    dense: &[f32],
    keep: &[bool],
) -> Result<(Vec<f32>, Vec<u8>), SparseError> {
    Sparse::check(n, m, cols)?;
    for (what, len) in [("dense matrix", dense.len()), ("keep mask", keep.len())] {
        if len as u64 != rows * cols {
            return Err(SparseError::Size { what, rows, cols, expected: rows * cols, found: len as u64 });
        }
    }
    let slots = cols / m * n;
    let mut values = vec![0f32; (rows * slots) as usize];
    let mut mask = vec![0u8; (rows * cols / 8) as usize];
    for r in 0..rows {
        for g in 0..cols / m {
            let (start, end) = (r * cols + g * m, r * cols + (g + 1) * m);
            let kept: Vec<u64> = (start..end).filter(|&i| keep[i as usize]).collect();
            if kept.len() as u64 > n {
                let found = kept.len() as u32;
                return Err(SparseError::Group { row: r, start: g * m, end: (g + 1) * m, found, n, m });
            }
            for (j, &i) in kept.iter().enumerate() {
                values[(r * slots + g * n) as usize + j] = dense[i as usize];
                mask[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
    }
    Ok((values, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-worked 2:4 row: the mask's bits pick columns, the values fill them in order.
    #[test]
    fn two_four_by_hand() {
        // Row 0 keeps columns 1, 3 | 4, 6; row 1 keeps column 2 only | 5, 7.
        let mask = [0b0101_1010, 0b1010_0100];
        let values = [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 6.0, 7.0];
        let w = densify(2, 4, 2, 8, &values, &mask).unwrap();
        assert_eq!(w, [0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 6.0, 0.0, 7.0]);
    }

    #[test]
    fn pack_inverts_densify() {
        let (rows, cols) = (3u64, 16u64);
        let dense: Vec<f32> = (0..rows * cols).map(|i| i as f32 - 20.0).collect();
        for (n, m) in [(2, 4), (1, 4), (4, 8), (5, 16)] {
            // Keep the n largest magnitudes of each group (ties to the left).
            let mut keep = vec![false; dense.len()];
            for group in (0..dense.len()).collect::<Vec<_>>().chunks(m as usize) {
                let mut order = group.to_vec();
                order.sort_by(|&a, &b| dense[b].abs().total_cmp(&dense[a].abs()));
                for &i in &order[..n as usize] {
                    keep[i] = true;
                }
            }
            let (values, mask) = pack(n, m, rows, cols, &dense, &keep).unwrap();
            assert_eq!(values.len() as u64, rows * cols / m * n);
            let back = densify(n, m, rows, cols, &values, &mask).unwrap();
            for i in 0..dense.len() {
                assert_eq!(back[i], if keep[i] { dense[i] } else { 0.0 }, "{n}:{m} at {i}");
            }
        }
    }

    #[test]
    fn too_many_values_in_a_group_is_an_error() {
        let keep = [true, true, true, false, false, false, false, false];
        let err = pack(2, 4, 1, 8, &[1.0; 8], &keep).unwrap_err();
        assert_eq!(err.to_string(), "row 0, columns 0..4: 3 values are stored where 2:4 allows 2");
        let err = densify(2, 4, 1, 8, &[1.0; 4], &[0b0111_0000]).unwrap_err();
        assert_eq!(err, SparseError::Group { row: 0, start: 4, end: 8, found: 3, n: 2, m: 4 });
    }

    #[test]
    fn patterns_are_checked() {
        assert!(Sparse::check(2, 4, 576).is_ok());
        assert!(Sparse::check(288, 576, 576).is_ok());
        for (n, m, cols) in [(0, 4, 8), (4, 4, 8), (2, 3, 8), (2, 4, 12), (2, 4, 0)] {
            assert!(Sparse::check(n, m, cols).is_err(), "{n}:{m} over {cols}");
        }
        assert!(matches!(densify(2, 4, 1, 8, &[0.0; 3], &[0]), Err(SparseError::Size { what: "values", .. })));
    }

    #[test]
    fn bits_per_weight_counts_the_mask() {
        let s = Sparse { n: 2, m: 4, mask: "m".into(), mask_checksum: None };
        assert_eq!(s.bits_per_weight("int4g32".parse().unwrap()), 3.25);
        assert_eq!(s.bits_per_weight(Format::F16), 9.0);
    }
}
