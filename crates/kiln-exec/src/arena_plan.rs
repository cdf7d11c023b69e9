//! Arena planning: one buffer for every intermediate value, with offsets chosen by
//! liveness so that values whose lifetimes do not overlap share memory.

use std::collections::BTreeMap;

/// A value to place: its size in f32 elements and the interval of steps during which it
/// must stay intact (`first` = the step that writes it, `last` = the last step that reads it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub size: usize,
    pub first: usize,
    pub last: usize,
}

/// Offsets (in f32 elements, each a multiple of 16 so every tensor is 64-byte aligned)
/// and the arena size. Greedy in order of first use, first fit over the gaps of the
/// currently live placements.
pub fn plan(values: &[Lifetime]) -> (Vec<usize>, usize) {
    const ALIGN: usize = 16;
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by_key(|&i| (values[i].first, std::cmp::Reverse(values[i].size), i));
    let mut offsets = vec![0; values.len()];
    // Live placements by offset: offset -> (end, last step).
    let mut live: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    let mut total = 0;
    for i in order {
        let v = values[i];
        live.retain(|_, &mut (_, last)| last >= v.first);
        let size = v.size.div_ceil(ALIGN) * ALIGN;
        let mut candidate = 0;
        for (&start, &(end, _)) in &live {
            if start >= candidate + size {
                break;
            }
            candidate = candidate.max(end);
        }
        offsets[i] = candidate;
        live.insert(candidate, (candidate + size, v.last));
        total = total.max(candidate + size);
    }
    (offsets, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: &Lifetime, oa: usize, b: &Lifetime, ob: usize) -> bool {
        let time = a.first <= b.last && b.first <= a.last;
        let space = oa < ob + b.size && ob < oa + a.size;
        time && space
    }

    #[test]
    fn disjoint_lifetimes_share_memory() {
        let v = [
            Lifetime { size: 100, first: 0, last: 1 },
            Lifetime { size: 100, first: 1, last: 2 },
            Lifetime { size: 100, first: 2, last: 3 },
        ];
        let (offsets, total) = plan(&v);
        assert_eq!(offsets[0], offsets[2], "value 2 reuses value 0's space");
        assert_ne!(offsets[0], offsets[1]);
        assert_eq!(total, 224);
    }

    #[test]
    fn live_values_never_overlap() {
        // A pseudo-random mix of sizes and lifetimes.
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for _ in 0..50 {
            let v: Vec<Lifetime> = (0..40)
                .map(|_| {
                    let first = next() % 30;
                    Lifetime { size: 1 + next() % 300, first, last: first + next() % 10 }
                })
                .collect();
            let (offsets, total) = plan(&v);
            for i in 0..v.len() {
                assert_eq!(offsets[i] % 16, 0);
                assert!(offsets[i] + v[i].size <= total);
                for j in 0..i {
                    assert!(!overlaps(&v[i], offsets[i], &v[j], offsets[j]), "{i} and {j} overlap");
                }
            }
        }
    }
}
