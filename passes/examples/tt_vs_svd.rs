//! Tensor train against truncated SVD at the same parameter count, per weight, unwhitened:
//! the relative Frobenius error `|W - W'|^2 / |W|^2` of each. What `factorize(method=tt)`
//! would start from, before whitening and healing.
//!
//! ```sh
//! cargo run --release -p kiln-passes --example tt_vs_svd -- \
//!   examples/minilm/minilm.kiln ~/.cache/kiln/models/minilm/model.safetensors [LAYERS]
//! ```
//!
//! For the first LAYERS (default 4) linears of the blocks and bonds 16, 32, 64 over three
//! modes per side ([`kiln_passes::factorize::tt::modes`]), prints the TT's parameters as a
//! fraction of the layer's, its error, and the error of the SVD whose rank keeps at most as
//! many parameters.

use kiln_ir::Op;
use kiln_passes::factorize::lowrank::{Spectrum, Whitening};
use kiln_passes::factorize::tt::{Train, modes};
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(spec), Some(weights)) = (args.first(), args.get(1)) else {
        eprintln!("usage: tt_vs_svd SPEC WEIGHTS [LAYERS]");
        std::process::exit(2);
    };
    let layers: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(4);
    let source = std::fs::read_to_string(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
    let checkpoint = kiln_frontend::checkpoint::load(Path::new(weights)).unwrap_or_else(|e| panic!("{weights}: {e}"));
    let graph = kiln_frontend::compile(&source, Some(&checkpoint)).unwrap_or_else(|e| panic!("{e:?}")).graph;
    let linears = graph.node_ids().filter(|&n| matches!(graph.node(n).op, Op::Linear { .. }));
    let weights: Vec<_> = linears
        .map(|n| graph.operands(n)[1])
        .filter(|&w| matches!(graph.node(w).op, Op::Weight(_)) && graph.users(w).len() == 1)
        .take(layers)
        .collect();
    println!("{:<44} {:>5} {:>9} {:>10} {:>10} {:>6}", "layer", "bond", "params", "TT error", "SVD error", "rank");
    for w in weights {
        let Op::Weight(weight) = &graph.node(w).op else { continue };
        let Some(shape) = graph.node(w).ty.known_shape() else { continue };
        let &[n, k] = shape.as_slice() else { continue };
        let (n, k) = (n as usize, k as usize);
        let values = weight.value(&graph.store, &shape).expect("decodes");
        let energy: f64 = values.iter().map(|v| (*v as f64).powi(2)).sum();
        let spectrum = Spectrum::new(&values, n, k, Whitening::None).expect("an SVD");
        let (out_modes, in_modes) = (modes(n, 3), modes(k, 3));
        for bond in [16, 32, 64] {
            let tt = Train::new(&values, &out_modes, &in_modes, bond).expect("a TT-SVD");
            let error: f64 = values.iter().zip(tt.weight()).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
            let rank = tt.params() / (n + k);
            let svd = if rank == 0 { energy } else { spectrum.error(rank.min(n.min(k))) };
            println!(
                "{:<44} {bond:>5} {:>9.3} {:>10.4} {:>10.4} {rank:>6}",
                graph.node(w).scope,
                tt.params() as f64 / (n * k) as f64,
                error / energy,
                svd / energy
            );
        }
    }
}
