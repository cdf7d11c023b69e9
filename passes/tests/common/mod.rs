//! What the integration tests of the passes share.

/// `len` deterministic values in [-0.5, 0.5) from `seed` (a linear congruential generator).
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// A stack of residual blocks `h = h + W2 relu(W1 h)` (`blk.I.up`, `blk.I.down`) over an
/// input `x : f32[r, WIDTH]`, and the same stack computed by hand.
#[allow(dead_code)]
pub mod stack {
    use kiln_ir::{Graph, TensorData};

    pub const WIDTH: usize = 8;
    pub const HIDDEN: usize = 16;

    /// A block's up (`[HIDDEN, WIDTH]`) and down (`[WIDTH, HIDDEN]`) weights.
    pub type Weights = (Vec<f32>, Vec<f32>);

    fn block(i: usize, input: usize) -> String {
        let n = input + 1;
        format!(
            "  %{w1} = weight \"blk.{i}.up\" f32 : f32[{HIDDEN}, {WIDTH}] @blk.{i}.up
  %{a} = linear %{input}, %{w1} : f32[r, {HIDDEN}] @blk.{i}.up
  %{b} = relu %{a} : f32[r, {HIDDEN}] @blk.{i}
  %{w2} = weight \"blk.{i}.down\" f32 : f32[{WIDTH}, {HIDDEN}] @blk.{i}.down
  %{c} = linear %{b}, %{w2} : f32[r, {WIDTH}] @blk.{i}.down
  %{d} = add %{input}, %{c} : f32[r, {WIDTH}] @blk.{i}
",
            w1 = n,
            a = n + 1,
            b = n + 2,
            w2 = n + 3,
            c = n + 4,
            d = n + 5
        )
    }

    /// The stack of one block per entry of `weights`.
    pub fn residual_stack(weights: &[Weights]) -> Graph {
        let mut text = format!("graph g {{\n  %0 = input \"x\" : f32[r, {WIDTH}]\n");
        for i in 0..weights.len() {
            text.push_str(&block(i, i * 6));
        }
        text.push_str(&format!("  output \"y\" = %{}\n}}\n", weights.len() * 6));
        let mut graph = kiln_ir::parse(&text).expect("the test IR parses");
        for (i, (up, down)) in weights.iter().enumerate() {
            graph.store.insert(format!("blk.{i}.up"), TensorData::from_f32(vec![HIDDEN as u64, WIDTH as u64], up));
            graph.store.insert(format!("blk.{i}.down"), TensorData::from_f32(vec![WIDTH as u64, HIDDEN as u64], down));
        }
        graph.layers = kiln_ir::LayerTable::derive(&graph);
        graph
    }

    /// The stack by hand, running only the blocks in `kept`.
    pub fn by_hand(x: &[f32], weights: &[Weights], kept: &[usize]) -> Vec<f32> {
        let mut out = Vec::new();
        for row in x.chunks(WIDTH) {
            let mut h = row.to_vec();
            for &i in kept {
                let (up, down) = &weights[i];
                let a: Vec<f32> =
                    (0..HIDDEN).map(|o| (0..WIDTH).map(|j| up[o * WIDTH + j] * h[j]).sum::<f32>().max(0.0)).collect();
                for (o, h) in h.iter_mut().enumerate() {
                    *h += (0..HIDDEN).map(|j| down[o * HIDDEN + j] * a[j]).sum::<f32>();
                }
            }
            out.extend(h);
        }
        out
    }
}
