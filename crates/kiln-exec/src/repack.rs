//! kiln's [`IntFormat`]s as GGUF blocks, so that the Q8_0/Q4_0/Q4_1 kernels run them.
//!
//! Every int format has a GGUF block format with the same values (not just close ones):
//!
//! | int format | runs as | code |
//! |---|---|---|
//! | `int{2,3,4}gG` (symmetric, `d (q - 2^(b-1))`) | `Q4_0` (`d (q' - 8)`) | `q' = q - 2^(b-1) + 8` |
//! | `int{2,3,4}gGa` (`d q + m`) | `Q4_1` (`d q + m`) | `q' = q` |
//! | `int8gG` (`d (q - 128)`) | `Q8_0` (`d q'`) | `q' = q - 128` as i8 |
//!
//! with the group's scales repeated in each of its `G / 32` blocks. The engine repacks an
//! int-format weight once, when it is built; the copy costs 4.5 (Q4_0), 5 (Q4_1) or 8.5
//! (Q8_0) bits per weight of memory whatever the stored width, so `int3` and `int2` save
//! bytes in the artifact and on disk but not yet in memory. Kernels that read the packed
//! codes directly would remove the copy.

use crate::engine::Activations;
use kiln_ir::{Bytes, Format, Fp8Format, Graph, IntFormat, Op, TensorData};

/// The GGUF format whose kernels run weights stored in `f`.
pub fn kernel_format(f: IntFormat) -> Format {
    match (f.bits, f.asym) {
        (8, _) => Format::Q8_0,
        (_, false) => Format::Q4_0,
        (_, true) => Format::Q4_1,
    }
}

/// The bytes of [`kernel_format`]`(f)` with exactly the values of `bytes`, stored in `f`.
/// `bytes` must hold whole blocks of `f` (as a verified weight does).
pub fn repack(f: IntFormat, bytes: &[u8]) -> Vec<u8> {
    let target = kernel_format(f);
    let blocks = bytes.len() / f.block_bytes();
    let mut out = Vec::with_capacity(blocks * f.group as usize / 32 * target.block_bytes() as usize);
    let mut codes = vec![0u8; f.group as usize];
    for block in bytes.chunks_exact(f.block_bytes()) {
        let s = f.unpack_block(block, &mut codes);
        for c in codes.chunks_exact(32) {
            out.extend(s.d.to_le_bytes());
            match target {
                Format::Q8_0 => out.extend(c.iter().map(|&q| q.wrapping_sub(128))),
                Format::Q4_1 => {
                    out.extend(s.m.to_le_bytes());
                    out.extend((0..16).map(|j| c[j] | c[j + 16] << 4));
                }
                _ => {
                    let shift = |q: u8| q + 8 - f.zero_code();
                    out.extend((0..16).map(|j| shift(c[j]) | shift(c[j + 16]) << 4));
                }
            }
        }
    }
    out
}

/// fp8 with groups of 32 (`fp8g32`), which the fp8 kernels read: `f` as stored, its
/// groups cut in blocks of 32 with the group's scale in each (the same values).
pub fn fp8_blocks(f: Fp8Format, bytes: &[u8]) -> Vec<u8> {
    let g = f.group as usize;
    let mut out = Vec::with_capacity(bytes.len() / (2 + g) * g / 32 * 34);
    for group in bytes.chunks_exact(2 + g) {
        for block in group[2..].chunks_exact(32) {
            out.extend_from_slice(&group[..2]);
            out.extend_from_slice(block);
        }
    }
    out
}

/// Stores every weight of `graph` that an engine would repack when it is
/// built ([`repack`], [`fp8_blocks`]) in the format its kernels read, with the same values:
/// what native programs embed, so that they start without repacking (SmolLM2 at
/// `bits=4.5`: 400-500 ms of start-up before, 160-180 after; see ARCHITECTURE.md). Engines
/// on the result compute the same bits: the same kernel specs, the same bytes (and every
/// linear's activations stay allowed: repacked int weights are GGUF blocks, which take
/// `int8` as they did). The weights of linears taking [`Activations::Int8Row`] keep their
/// format (the per-row kernels read them as stored). Returns how many tensors changed.
pub fn prepack(graph: &mut Graph) -> Result<usize, kiln_ir::FormatError> {
    let mut changed = 0;
    let per_row: std::collections::HashSet<String> = graph
        .node_ids()
        .filter(|&id| matches!(graph.node(id).op, Op::Linear { activations: Activations::Int8Row }))
        .filter_map(|id| match &graph.node(graph.operands(id)[1]).op {
            Op::Weight(w) => Some(w.tensor.clone()),
            _ => None,
        })
        .collect();
    let nodes: Vec<_> = graph.node_ids().collect();
    let mut done: std::collections::HashMap<String, (Format, u64)> = Default::default();
    for id in nodes {
        let Op::Weight(w) = &graph.node(id).op else { continue };
        if w.sparse.is_some() {
            continue; // read through its dense value (engine.rs)
        }
        let name = w.tensor.clone();
        if let Some(&(format, checksum)) = done.get(&name) {
            // A tied weight: another node read the same tensor.
            if let Op::Weight(w) = &mut graph.node_mut(id).op {
                (w.format, w.checksum) = (format, Some(checksum));
            }
            continue;
        }
        let Some(data) = graph.store.get(&name) else { continue };
        let (format, bytes) = match data.format {
            Format::Int(f) if !per_row.contains(&name) => (kernel_format(f), repack(f, data.bytes.as_slice())),
            Format::Fp8(f) if f.group != 32 => {
                (Format::Fp8(Fp8Format { group: 32 }), fp8_blocks(f, data.bytes.as_slice()))
            }
            _ => continue,
        };
        let data = TensorData::new(format, data.shape.clone(), Bytes::from_vec(bytes))?;
        let checksum = data.checksum();
        graph.store.insert(name.clone(), data);
        if let Op::Weight(w) = &mut graph.node_mut(id).op {
            (w.format, w.checksum) = (format, Some(checksum));
        }
        done.insert(name, (format, checksum));
        changed += 1;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fp8 groups cut in blocks of 32 decode to bitwise the same values.
    #[test]
    fn fp8_blocks_have_the_same_values() {
        for group in [32u32, 64, 96, 576] {
            let f = Fp8Format::new(group).unwrap();
            let values: Vec<f32> = (0..2 * group).map(|i| ((i * 7919 % 401) as f32 - 200.0) / 37.0).collect();
            let bytes = f.quantize(&values);
            let blocks = fp8_blocks(f, &bytes);
            let want = Format::Fp8(f).dequantize(&bytes, values.len() as u64).unwrap();
            let got = Format::Fp8(Fp8Format { group: 32 }).dequantize(&blocks, values.len() as u64).unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "fp8g{group}"
            );
        }
    }

    /// Every format, random codes and scales (negative, tiny and large ones included):
    /// the repacked bytes decode to bitwise the same values.
    #[test]
    fn repacked_weights_have_the_same_values() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for bits in [2, 3, 4, 8] {
            for group in [32, 64, 128, 576] {
                for asym in [false, true] {
                    let Ok(f) = IntFormat::new(bits, group, asym) else { continue };
                    let mut bytes = Vec::new();
                    for _ in 0..6 {
                        let d = half::f16::from_bits(next() as u16 & 0x7BFF | (next() as u16 & 0x8000));
                        let m = half::f16::from_f32((next() % 2000) as f32 / 100.0 - 10.0);
                        let codes: Vec<u8> = (0..group).map(|_| next() as u8 & f.max_code()).collect();
                        f.pack_block(kiln_ir::BlockScales { d, m }, &codes, &mut bytes);
                    }
                    let n = 6 * group as u64;
                    let want = Format::Int(f).dequantize(&bytes, n).unwrap();
                    let got = kernel_format(f).dequantize(&repack(f, &bytes), n).unwrap();
                    let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{f}");
                }
            }
        }
    }

    /// `prepack` stores int weights as their kernel formats, with the same values and the
    /// checksums of the new bytes, in every node that reads them; int8 weights stay as
    /// stored for per-row activations.
    #[test]
    fn prepack_stores_kernel_formats() {
        let f = IntFormat::new(4, 64, true).unwrap();
        let int8 = IntFormat::new(8, 64, false).unwrap();
        let mut g = Graph::new("t");
        let mut bytes = Vec::new();
        for i in 0..4u8 {
            let codes: Vec<u8> = (0..64).map(|j| (j as u8 + i) % 16).collect();
            let scales = kiln_ir::BlockScales { d: half::f16::from_f32(0.25), m: half::f16::from_f32(-1.0) };
            f.pack_block(scales, &codes, &mut bytes);
        }
        let mut bytes8 = Vec::new();
        for _ in 0..4 {
            let codes: Vec<u8> = (0..64).map(|j| j as u8 * 3).collect();
            int8.pack_block(
                kiln_ir::BlockScales { d: half::f16::from_f32(0.5), m: half::f16::ZERO },
                &codes,
                &mut bytes8,
            );
        }
        let weight = |g: &mut Graph, name: &str, format: IntFormat, bytes: &[u8]| {
            let data = TensorData::new(Format::Int(format), vec![4, 64], Bytes::from_vec(bytes.to_vec())).unwrap();
            let w = kiln_ir::WeightRef::dense(name, Format::Int(format), Some(data.checksum()));
            g.store.insert(name, data);
            let ty = kiln_ir::Type::f32([kiln_ir::Dim::Known(4), kiln_ir::Dim::Known(64)]);
            g.add_typed(Op::Weight(w), &[], ty, "", None)
        };
        let (a, b, c) =
            (weight(&mut g, "w", f, &bytes), weight(&mut g, "w", f, &bytes), weight(&mut g, "w8", int8, &bytes8));
        let values = |g: &Graph, name: &str| g.store.get(name).unwrap().to_f32().unwrap();
        let (want, want8) = (values(&g, "w"), values(&g, "w8"));
        // Linears on both: under int8-row the one on int8g64 (64 values per row) takes
        // per-row activations, which read its weight as stored.
        let ty = kiln_ir::Type::f32([kiln_ir::Dim::Known(1), kiln_ir::Dim::Known(64)]);
        let x = g.add_typed(Op::Input { name: "x".into() }, &[], ty, "", None);
        for w in [a, c] {
            let y = g.add(Op::Linear { activations: Activations::F32 }, &[x, w], "", None).unwrap();
            g.set_output(&format!("y{}", w.index()), y).unwrap();
        }
        let mut rows = g.clone();
        assert_eq!(kiln_ir::set_activations(&mut rows, Activations::Int8Row), 2);
        assert_eq!(prepack(&mut rows).unwrap(), 1);
        assert_eq!(rows.store.get("w8").unwrap().format, Format::Int(int8));
        kiln_ir::verify(&rows).unwrap();
        let mut blocks = g.clone();
        assert_eq!(kiln_ir::set_activations(&mut blocks, Activations::Int8), 2);
        assert_eq!(prepack(&mut blocks).unwrap(), 2);
        kiln_ir::verify(&blocks).unwrap();
        assert_eq!(prepack(&mut g).unwrap(), 2);
        for (node, name, format, values) in
            [(a, "w", Format::Q4_1, &want), (b, "w", Format::Q4_1, &want), (c, "w8", Format::Q8_0, &want8)]
        {
            let Op::Weight(w) = &g.node(node).op else { unreachable!() };
            let data = g.store.get(name).unwrap();
            assert_eq!((w.format, data.format, w.checksum), (format, format, Some(data.checksum())));
            assert_eq!(
                data.to_f32().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
