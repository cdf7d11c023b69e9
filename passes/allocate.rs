//! `allocate`: choose one way of storing each layer so the model fits a budget of storage
//! bits with the least total sensitivity: the formats of `quantize` (the budgeted
//! allocation of a mixed-precision quantizer), the ranks of `factorize`.
//!
//! Layer `l` offers choices `j` with a cost `b[l][j]` (bits to store the layer that way:
//! weights, scales, zero points) and a sensitivity `s[l][j]` (the output error measured with
//! the layer stored that way). We pick one `j(l)` per layer minimizing `Σ s[l][j(l)]` subject
//! to `Σ b[l][j(l)] <= B`: a multiple-choice knapsack, solved as in Hubara et al. ("Accurate
//! Post Training Quantization With Small Calibration Sets") by dynamic programming over a
//! discretized budget. Sensitivities are taken as additive across layers.
//!
//! 1. Fixed layers (overrides) are charged their choice, every other layer its cheapest one.
//!    If that exceeds `B` no allocation exists ([`AllocError::Infeasible`]). What is left is
//!    the slack, and a choice costs its excess `e = b - min_j b` over the layer's cheapest.
//! 2. Discretization. With `g` the gcd of all excesses, the unit is `u = g·k` for the least
//!    `k` making `min(slack, Σ_l max_j e)/u` at most [`MAX_CELLS`] (fewer if the back-pointer
//!    table would pass [`MAX_TABLE_BYTES`]). Costs round up to `⌈e/u⌉` cells, the slack down
//!    to `⌊slack/u⌋`, so a pick that fits in cells fits in bits:
//!    `Σ e <= u·Σ⌈e/u⌉ <= u·⌊slack/u⌋ <= slack`. The result is never over budget. It is
//!    exactly optimal when `k = 1` (small budgets, or costs that are multiples of a coarse
//!    unit); otherwise each of the `L` free layers loses less than one unit to rounding, so it
//!    is at least as good as the exact optimum for the budget `B - L·u`.
//! 3. Per layer, choices are sorted by cells and those no better than a cheaper one dropped,
//!    leaving a list whose first entry costs 0 cells.
//! 4. `f_l(c)`, the least sensitivity of layers `..=l` within `c` cells, is
//!    `min_j f_{l-1}(c - w_j) + s_j` with `f_{-1} = 0`; two rows of `f64` and a table of
//!    back-pointers (the index of the choice taken, a `u8` when no layer has more than 256
//!    choices) per (layer, cell). The answer ends at the least `c` with `f(c) = f(C)`.
//! 5. What rounding left of the budget is spent in exact bits: while some single layer's change
//!    of choice lowers the total and still fits, the best such change is made (at most `L`
//!    of them). This only improves the result, and finds nothing when the DP was exact.
//!
//! Time is `O(Σ_l K_l · C)` for `K_l` surviving choices and `C <= MAX_CELLS + L` cells, plus
//! `O(L · Σ_l K_l)` for step 5; memory `O(L · C)` bytes. For 211 layers of 10 choices that is
//! about 4·10⁸ compare-and-selects (a few tenths of a second in a release build) and 42 MB.
//! A list of Pareto-optimal `(bits, sensitivity)` states per layer prefix would be exact in
//! bits, but its length is bounded only by the number of distinct sums; bounding it takes the
//! same discretization, after which the dense table is simpler, its memory known in advance,
//! and its inner loop a branch-predictable scan.
//!
//! Ties are broken deterministically: among optimal picks, the fewest cells in total; at each
//! layer from the last, the choice with fewer cells, then fewer bits, then the lower index.

/// Upper bound on budget cells (discretized units of bits) in the table.
pub const MAX_CELLS: usize = 200_000;

/// Size the back-pointer table is planned for (it may reach twice this with rounding); with
/// many layers, cells get coarser.
pub const MAX_TABLE_BYTES: usize = 64 << 20;

/// One way to store a layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// Storage cost in bits: weights, scales and zero points.
    pub bits: u64,
    /// Output error measured with the layer stored this way; smaller is better. Finite.
    pub sensitivity: f64,
}

/// A layer's choices, and optionally one forced before the search (an override).
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub choices: Vec<Choice>,
    /// Index into `choices` to take regardless of cost or sensitivity.
    pub fixed: Option<usize>,
}

/// The chosen index per layer, with the totals of the chosen choices.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub picks: Vec<usize>,
    /// Total storage bits; never more than the budget.
    pub bits: u64,
    /// Total sensitivity, summed in layer order.
    pub sensitivity: f64,
}

/// Why no allocation was produced.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AllocError {
    #[error("layer {layer} has no choices")]
    NoChoices { layer: usize },
    #[error("layer {layer} is fixed to choice {choice}, but has {count} choices")]
    BadFixed { layer: usize, choice: usize, count: usize },
    #[error("layer {layer}, choice {choice}: sensitivity {sensitivity} is not finite")]
    NonFinite { layer: usize, choice: usize, sensitivity: f64 },
    #[error(
        "a budget of {budget_bits} bits cannot be met: the fixed choices and the cheapest of the \
         others need {needed_bits} bits"
    )]
    Infeasible { needed_bits: u128, budget_bits: u64 },
}

/// Picks one choice per layer minimizing total sensitivity with total bits at most
/// `budget_bits`, honoring fixed choices. See the module documentation for the guarantees.
pub fn allocate(layers: &[Layer], budget_bits: u64) -> Result<Allocation, AllocError> {
    allocate_in(layers, budget_bits, MAX_CELLS)
}

/// A choice that survived pruning: its cost in cells and its index in the layer.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    cells: usize,
    bits: u64,
    sensitivity: f64,
    index: usize,
}

/// [`allocate`] with at most about `max_cells` budget cells (tests use few, to exercise
/// rounding).
fn allocate_in(layers: &[Layer], budget_bits: u64, max_cells: usize) -> Result<Allocation, AllocError> {
    // Validate, charge fixed layers, and find each free layer's cheapest choice.
    let mut needed: u128 = 0;
    let mut free = vec![]; // (layer, cheapest bits)
    let mut widest = 1; // most choices of any free layer
    for (l, layer) in layers.iter().enumerate() {
        if layer.choices.is_empty() {
            return Err(AllocError::NoChoices { layer: l });
        }
        if let Some((choice, c)) = layer.choices.iter().enumerate().find(|(_, c)| !c.sensitivity.is_finite()) {
            return Err(AllocError::NonFinite { layer: l, choice, sensitivity: c.sensitivity });
        }
        match layer.fixed {
            Some(choice) => {
                let c = layer.choices.get(choice).ok_or(AllocError::BadFixed {
                    layer: l,
                    choice,
                    count: layer.choices.len(),
                })?;
                needed += u128::from(c.bits);
            }
            None => {
                let min = layer.choices.iter().map(|c| c.bits).min().unwrap_or(0);
                needed += u128::from(min);
                free.push((l, min));
                widest = widest.max(layer.choices.len());
            }
        }
    }
    let slack = match u64::try_from(needed) {
        Ok(n) if n <= budget_bits => budget_bits - n,
        _ => return Err(AllocError::Infeasible { needed_bits: needed, budget_bits }),
    };

    // Discretize: unit = g * k bits (see the module documentation).
    let (mut g, mut span) = (0u64, 0u128);
    for &(l, min) in &free {
        let excess = layers[l].choices.iter().map(|c| c.bits - min);
        g = excess.clone().fold(g, gcd);
        span += u128::from(excess.max().unwrap_or(0));
    }
    let g = g.max(1);
    let slot_bytes = match widest {
        0..=256 => 1,
        257..=65_536 => 2,
        _ => 4,
    };
    let max_cells = max_cells.min(MAX_TABLE_BYTES / slot_bytes / free.len().max(1)).max(1) as u64;
    let reach = u64::try_from(span.min(u128::from(slack))).unwrap_or(slack) / g;
    let k = reach.div_ceil(max_cells).max(1);
    let cells_of = |bits: u64, min: u64| ((bits - min) / g).div_ceil(k);
    let full = slack / g / k;
    let widest_cells: u128 = free
        .iter()
        .map(|&(l, min)| {
            let cells = layers[l].choices.iter().map(|c| cells_of(c.bits, min)).filter(|&c| c <= full);
            u128::from(cells.max().unwrap_or(0))
        })
        .sum();
    // Σ max cells exceeds max_cells by less than one per layer (its rounding); the last clamp
    // binds only with more layers than cells, keeping the table within twice its budget.
    let cap = u64::try_from(widest_cells).map_or(full, |w| w.min(full)).min(2 * max_cells) as usize;

    // Prune each free layer to its useful choices, fewest cells first.
    let options: Vec<Vec<Candidate>> = free
        .iter()
        .map(|&(l, min)| {
            let mut all: Vec<Candidate> = (layers[l].choices.iter().enumerate())
                .map(|(index, c)| (index, c, cells_of(c.bits, min)))
                .filter(|&(_, _, cells)| cells <= cap as u64)
                .map(|(index, c, cells)| Candidate {
                    cells: cells as usize,
                    bits: c.bits,
                    sensitivity: c.sensitivity,
                    index,
                })
                .collect();
            all.sort_by(|a, b| {
                (a.cells.cmp(&b.cells))
                    .then(a.sensitivity.total_cmp(&b.sensitivity))
                    .then(a.bits.cmp(&b.bits))
                    .then(a.index.cmp(&b.index))
            });
            let mut kept: Vec<Candidate> = Vec::with_capacity(all.len());
            for o in all {
                if kept.last().is_none_or(|k| o.sensitivity < k.sensitivity) {
                    kept.push(o);
                }
            }
            kept
        })
        .collect();

    let taken = match slot_bytes {
        1 => solve::<u8>(&options, cap),
        2 => solve::<u16>(&options, cap),
        _ => solve::<u32>(&options, cap),
    };

    let mut picks: Vec<usize> = layers.iter().map(|layer| layer.fixed.unwrap_or(0)).collect();
    for (&(l, _), o) in free.iter().zip(taken) {
        picks[l] = o.index;
    }
    polish(layers, &free, &mut picks, budget_bits);
    let chosen = || layers.iter().zip(&picks).map(|(layer, &j)| layer.choices[j]);
    let bits: u128 = chosen().map(|c| u128::from(c.bits)).sum();
    let sensitivity = chosen().map(|c| c.sensitivity).sum();
    debug_assert!(bits <= u128::from(budget_bits), "allocation over budget: {bits} > {budget_bits}");
    Ok(Allocation { picks, bits: bits as u64, sensitivity })
}

/// Spends what rounding left of the budget: repeatedly moves the one free layer whose change
/// of choice lowers the sensitivity most while the total stays within `budget` (ties: fewer
/// bits, then the earlier layer and choice). At most one round per free layer.
fn polish(layers: &[Layer], free: &[(usize, u64)], picks: &mut [usize], budget: u64) {
    let mut bits: u128 = layers.iter().zip(&*picks).map(|(layer, &j)| u128::from(layer.choices[j].bits)).sum();
    for _ in 0..free.len() {
        let mut best: Option<(f64, u64, usize, usize)> = None; // (drop, bits, layer, choice)
        for &(l, _) in free {
            let now = layers[l].choices[picks[l]];
            for (j, c) in layers[l].choices.iter().enumerate() {
                let total = bits - u128::from(now.bits) + u128::from(c.bits);
                let drop = now.sensitivity - c.sensitivity;
                if drop > 0.0
                    && total <= u128::from(budget)
                    && best.is_none_or(|(d, b, _, _)| drop > d || (drop == d && c.bits < b))
                {
                    best = Some((drop, c.bits, l, j));
                }
            }
        }
        let Some((_, _, l, j)) = best else { break };
        bits = bits - u128::from(layers[l].choices[picks[l]].bits) + u128::from(layers[l].choices[j].bits);
        picks[l] = j;
    }
}

/// Runs the DP over `cap + 1` cells and returns the option taken for each layer. Every
/// layer's first option costs 0 cells, so every cell of every row is reachable.
fn solve<S: Slot>(options: &[Vec<Candidate>], cap: usize) -> Vec<Candidate> {
    let width = cap + 1;
    let mut prev = vec![0.0f64; width];
    let mut next = vec![0.0f64; width];
    let mut back = vec![S::from_index(0); options.len() * width];
    for (opts, row) in options.iter().zip(back.chunks_exact_mut(width)) {
        let Some(first) = opts.first() else { continue };
        for (n, p) in next.iter_mut().zip(&prev) {
            *n = p + first.sensitivity;
        }
        for (j, o) in opts.iter().enumerate().skip(1) {
            let (slot, s, w) = (S::from_index(j), o.sensitivity, o.cells);
            for ((n, b), p) in next[w..].iter_mut().zip(&mut row[w..]).zip(&prev[..width - w]) {
                let candidate = p + s;
                if candidate < *n {
                    *n = candidate;
                    *b = slot;
                }
            }
        }
        std::mem::swap(&mut prev, &mut next);
    }
    // `prev` is non-increasing in the cell: take the fewest cells reaching the optimum.
    let best = prev[cap];
    let mut cell = prev.partition_point(|&f| f > best);
    let mut taken = vec![];
    for (opts, row) in options.iter().zip(back.chunks_exact(width)).rev() {
        let o = opts[row[cell].index()];
        cell -= o.cells;
        taken.push(o);
    }
    taken.reverse();
    taken
}

/// A back-pointer: the index of the option a layer took, as narrow as its choices allow.
trait Slot: Copy {
    fn from_index(j: usize) -> Self;
    fn index(self) -> usize;
}

macro_rules! slot {
    ($($t:ty),*) => {$(
        impl Slot for $t {
            fn from_index(j: usize) -> Self {
                j as $t
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    )*};
}
slot!(u8, u16, u32);

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a small deterministic generator, so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        /// Uniform in `lo..=hi`.
        fn range(&mut self, lo: u64, hi: u64) -> u64 {
            lo + self.next() % (hi - lo + 1)
        }
    }

    fn layer(choices: &[(u64, f64)]) -> Layer {
        Layer {
            choices: choices.iter().map(|&(bits, sensitivity)| Choice { bits, sensitivity }).collect(),
            fixed: None,
        }
    }

    /// The least total sensitivity over all feasible picks, by enumeration, or the least
    /// bits any pick needs when none is feasible.
    fn brute_force(layers: &[Layer], budget: u64) -> Result<f64, u128> {
        let allowed: Vec<Vec<usize>> =
            layers.iter().map(|l| l.fixed.map_or_else(|| (0..l.choices.len()).collect(), |j| vec![j])).collect();
        let mut best: Option<f64> = None;
        let mut least = u128::MAX;
        let mut pick = vec![0usize; layers.len()];
        loop {
            let chosen = || layers.iter().zip(&allowed).zip(&pick).map(|((l, a), &p)| l.choices[a[p]]);
            let bits: u128 = chosen().map(|c| u128::from(c.bits)).sum();
            least = least.min(bits);
            if bits <= u128::from(budget) {
                let s: f64 = chosen().map(|c| c.sensitivity).sum();
                best = Some(best.map_or(s, |b| b.min(s)));
            }
            // Odometer increment.
            let Some(l) = (0..layers.len()).find(|&l| pick[l] + 1 < allowed[l].len()) else { break };
            pick[l] += 1;
            pick[..l].fill(0);
        }
        best.ok_or(least)
    }

    /// Checks the invariants of a returned allocation against its input.
    fn check(layers: &[Layer], budget: u64, a: &Allocation) {
        assert_eq!(a.picks.len(), layers.len());
        let mut bits = 0u64;
        let mut s = 0.0;
        for (l, (layer, &j)) in layers.iter().zip(&a.picks).enumerate() {
            assert!(j < layer.choices.len(), "layer {l}: pick {j} out of range");
            if let Some(f) = layer.fixed {
                assert_eq!(j, f, "layer {l}: fixed choice not honored");
            }
            bits += layer.choices[j].bits;
            s += layer.choices[j].sensitivity;
        }
        assert_eq!(a.bits, bits);
        assert!(bits <= budget, "over budget: {bits} > {budget}");
        assert!((a.sensitivity - s).abs() <= 1e-9 * s.abs().max(1.0));
    }

    /// A random instance of up to 5 layers of up to 4 choices, costs multiples of `unit`.
    fn small_instance(rng: &mut Rng, unit: u64) -> (Vec<Layer>, u64) {
        let n = rng.range(1, 5) as usize;
        let layers: Vec<Layer> = (0..n)
            .map(|_| {
                let k = rng.range(1, 4) as usize;
                // Quarter steps make ties between different picks common.
                let choices = (0..k)
                    .map(|_| Choice { bits: unit * rng.range(1, 12), sensitivity: rng.range(0, 40) as f64 / 4.0 })
                    .collect();
                let fixed = (rng.range(0, 5) == 0).then(|| rng.range(0, k as u64 - 1) as usize);
                Layer { choices, fixed }
            })
            .collect();
        let least: u64 = layers.iter().map(|l| l.choices.iter().map(|c| c.bits).min().unwrap_or(0)).sum();
        let most: u64 = layers.iter().map(|l| l.choices.iter().map(|c| c.bits).max().unwrap_or(0)).sum();
        // Sometimes below the least (infeasible), sometimes above the most (unconstrained).
        let budget = rng.range(least.saturating_sub(2 * unit), most + unit);
        (layers, budget)
    }

    #[test]
    fn matches_brute_force_on_small_instances() {
        let mut rng = Rng(1);
        let (mut feasible, mut infeasible) = (0, 0);
        for case in 0..600 {
            // Unit 1 << 30 puts the budget far past MAX_CELLS bits: exact only through the gcd.
            let unit = [1, 8, 1 << 30][case % 3];
            let (layers, budget) = small_instance(&mut rng, unit);
            match (allocate(&layers, budget), brute_force(&layers, budget)) {
                (Ok(a), Ok(best)) => {
                    check(&layers, budget, &a);
                    assert!((a.sensitivity - best).abs() < 1e-9, "case {case}: {} vs optimum {best}", a.sensitivity);
                    feasible += 1;
                }
                (Err(AllocError::Infeasible { needed_bits, budget_bits }), Err(least)) => {
                    assert_eq!((needed_bits, budget_bits), (least, budget), "case {case}");
                    infeasible += 1;
                }
                (got, want) => panic!("case {case}: {got:?}, brute force {want:?}\n{layers:?} budget {budget}"),
            }
        }
        assert!(feasible > 300 && infeasible > 20, "{feasible} feasible, {infeasible} infeasible cases");
    }

    #[test]
    fn coarse_cells_never_exceed_the_budget() {
        // Arbitrary costs and a handful of cells: every pick is rounded, none may overflow.
        let mut rng = Rng(2);
        let mut rounded = 0;
        for case in 0..600 {
            let (layers, budget) = small_instance(&mut rng, 1);
            let layers: Vec<Layer> = layers
                .into_iter()
                .map(|mut l| {
                    l.choices.iter_mut().for_each(|c| c.bits = c.bits * 37 + rng.range(0, 36));
                    l
                })
                .collect();
            let budget = budget * 37 + rng.range(0, 36);
            let cells = rng.range(1, 4) as usize;
            match (allocate_in(&layers, budget, cells), brute_force(&layers, budget)) {
                (Ok(a), Ok(best)) => {
                    check(&layers, budget, &a);
                    assert!(a.sensitivity >= best - 1e-9, "case {case}: better than the optimum");
                    rounded += usize::from(a.sensitivity > best + 1e-9);
                }
                (Err(AllocError::Infeasible { needed_bits, .. }), Err(least)) => assert_eq!(needed_bits, least),
                (got, want) => panic!("case {case}: {got:?}, brute force {want:?}\n{layers:?} budget {budget}"),
            }
        }
        // The cases really were coarse (else this test checks nothing the first does not).
        assert!(rounded > 0, "only {rounded} cases lost anything to rounding");
    }

    /// Greedy by ratio: start from the cheapest choices and keep taking the upgrade with the
    /// largest sensitivity drop per extra bit that still fits.
    fn greedy(layers: &[Layer], budget: u64) -> f64 {
        let mut picks: Vec<usize> = (layers.iter())
            .map(|l| (0..l.choices.len()).min_by_key(|&j| (l.choices[j].bits, j)).unwrap_or(0))
            .collect();
        let mut bits: u64 = layers.iter().zip(&picks).map(|(l, &j)| l.choices[j].bits).sum();
        loop {
            let mut best: Option<(f64, usize, usize)> = None;
            for (l, layer) in layers.iter().enumerate() {
                let now = layer.choices[picks[l]];
                for (j, c) in layer.choices.iter().enumerate() {
                    let (extra, drop) = (c.bits.saturating_sub(now.bits), now.sensitivity - c.sensitivity);
                    if c.bits > now.bits && drop > 0.0 && bits + extra <= budget {
                        let ratio = drop / extra as f64;
                        if best.is_none_or(|(r, _, _)| ratio > r) {
                            best = Some((ratio, l, j));
                        }
                    }
                }
            }
            let Some((_, l, j)) = best else { break };
            bits += layers[l].choices[j].bits - layers[l].choices[picks[l]].bits;
            picks[l] = j;
        }
        layers.iter().zip(&picks).map(|(l, &j)| l.choices[j].sensitivity).sum()
    }

    /// A lower bound on the optimum (weak duality): for every price `λ >= 0` of a bit,
    /// `Σ_l min_j (s + λ·b) - λ·B`; the best over a log-spaced sweep of prices.
    fn lagrange_bound(layers: &[Layer], budget: u64) -> f64 {
        let dual = |price: f64| {
            let each =
                |l: &Layer| l.choices.iter().map(|c| c.sensitivity + price * c.bits as f64).fold(f64::MAX, f64::min);
            layers.iter().map(each).sum::<f64>() - price * budget as f64
        };
        (0..4000).map(|i| dual(10f64.powf(-8.0 + f64::from(i) / 500.0))).fold(dual(0.0), f64::max)
    }

    #[test]
    fn beats_greedy_by_ratio() {
        // Upgrading A costs 1 bit for 2 (ratio 2); B costs 10 bits for 10 (ratio 1). The slack
        // is 10 bits: greedy upgrades A and then B no longer fits; the optimum upgrades B.
        let layers = [layer(&[(10, 3.0), (11, 1.0)]), layer(&[(10, 10.0), (20, 0.0)])];
        assert_eq!(greedy(&layers, 30), 11.0);
        let a = allocate(&layers, 30).expect("feasible");
        check(&layers, 30, &a);
        assert_eq!(a, Allocation { picks: vec![0, 1], bits: 30, sensitivity: 3.0 });
    }

    #[test]
    fn fixed_layers_are_honored() {
        // Free, the search would give B its expensive, exact choice.
        let mut layers = vec![layer(&[(4, 8.0), (8, 1.0), (16, 0.5)]), layer(&[(4, 9.0), (8, 0.0)])];
        assert_eq!(allocate(&layers, 16).expect("feasible").picks, vec![1, 1]);
        // Fixed to a worse, more expensive choice: taken, and its bits leave B the cheap one.
        layers[0].fixed = Some(2);
        let a = allocate(&layers, 20).expect("feasible");
        check(&layers, 20, &a);
        assert_eq!(a, Allocation { picks: vec![2, 0], bits: 20, sensitivity: 9.5 });
        // Fixed to the cheapest, though a better choice fits.
        layers[0].fixed = Some(0);
        let a = allocate(&layers, 100).expect("feasible");
        assert_eq!(a, Allocation { picks: vec![0, 1], bits: 12, sensitivity: 8.0 });
    }

    #[test]
    fn ties_prefer_fewer_bits_then_lower_index() {
        let layers = [layer(&[(16, 1.0), (8, 1.0), (8, 1.0), (12, 1.0)])];
        assert_eq!(allocate(&layers, 100).expect("feasible").picks, vec![1]);
        // Equal totals 2.0 at 12 bits (B upgraded) and at 16 (A upgraded): the fewer bits win.
        let layers = [layer(&[(12, 0.0), (4, 1.0), (4, 1.0)]), layer(&[(4, 2.0), (8, 1.0)])];
        let a = allocate(&layers, 16).expect("feasible");
        assert_eq!((a.picks, a.bits, a.sensitivity), (vec![1, 1], 12, 2.0));
        // Equal totals at equal bits: the later layer keeps the cheaper choice.
        let layers = [layer(&[(4, 2.0), (8, 1.0)]), layer(&[(4, 2.0), (8, 1.0)])];
        assert_eq!(allocate(&layers, 12).expect("feasible").picks, vec![1, 0]);
    }

    #[test]
    fn infeasible_budget_reports_the_minimum() {
        let mut layers = vec![layer(&[(8, 1.0), (5, 2.0)]), layer(&[(7, 0.0), (9, 0.0)])];
        assert_eq!(allocate(&layers, 11), Err(AllocError::Infeasible { needed_bits: 12, budget_bits: 11 }));
        assert_eq!(allocate(&layers, 12).expect("feasible").bits, 12);
        // A fixed layer is charged its choice, not its cheapest.
        layers[1].fixed = Some(1);
        assert_eq!(allocate(&layers, 13), Err(AllocError::Infeasible { needed_bits: 14, budget_bits: 13 }));
        // Sums past u64 are reported, not wrapped.
        let huge = [layer(&[(u64::MAX, 0.0)]), layer(&[(2, 0.0)])];
        let needed_bits = u128::from(u64::MAX) + 2;
        assert_eq!(allocate(&huge, u64::MAX), Err(AllocError::Infeasible { needed_bits, budget_bits: u64::MAX }));
    }

    #[test]
    fn rejects_malformed_layers() {
        let good = layer(&[(8, 1.0)]);
        let empty = Layer { choices: vec![], fixed: None };
        assert_eq!(allocate(&[good.clone(), empty], 100), Err(AllocError::NoChoices { layer: 1 }));
        let bad = Layer { fixed: Some(1), ..good.clone() };
        assert_eq!(allocate(&[bad], 100), Err(AllocError::BadFixed { layer: 0, choice: 1, count: 1 }));
        let nan = layer(&[(8, 1.0), (4, f64::NAN)]);
        assert!(matches!(allocate(&[good, nan], 100), Err(AllocError::NonFinite { layer: 1, choice: 1, .. })));
    }

    #[test]
    fn large_instance_stays_within_budget() {
        // 200 layers of up to a million weights; 10 formats from 2 to 8 bits per weight plus
        // a scale and zero point per group of 32; error quartering per extra bit, with noise.
        let mut rng = Rng(3);
        let sizes: Vec<u64> = (0..200).map(|_| rng.range(10_000, 1_000_000)).collect();
        let layers: Vec<Layer> = (sizes.iter())
            .map(|&params| {
                let choices = (0..10)
                    .map(|j| {
                        let bpw = 2.0 + 6.0 * j as f64 / 9.0;
                        let bits = (params as f64 * bpw).round() as u64 + params.div_ceil(32) * 32;
                        let noise = 1.0 + rng.range(0, 1000) as f64 / 2000.0;
                        Choice { bits, sensitivity: params as f64 * (-1.386 * bpw).exp() * noise }
                    })
                    .collect();
                Layer { choices, fixed: None }
            })
            .collect();
        let budget = (sizes.iter().sum::<u64>() as f64 * 4.5) as u64;
        let start = std::time::Instant::now();
        let a = allocate(&layers, budget).expect("feasible");
        eprintln!("200 x 10 choices: {:?}", start.elapsed());
        check(&layers, budget, &a);
        // Every layer can still improve, so the optimum leaves less than one upgrade unused.
        assert!(a.bits as f64 > 0.99 * budget as f64, "{} of {budget} bits used", a.bits);
        assert!(a.picks.iter().any(|&j| j > 0));
        // Rounding costs at most a little: within 0.1% of a lower bound on the optimum.
        let bound = lagrange_bound(&layers, budget);
        assert!(a.sensitivity <= bound * 1.001, "{} vs lower bound {bound}", a.sensitivity);
    }
}
