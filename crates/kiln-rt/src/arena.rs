//! One aligned buffer for every intermediate tensor of a compiled program.

/// A zeroed, 64-byte aligned buffer of `f32`s. A program plans byte offsets into it once
/// (by liveness) and reuses it for every run.
pub struct Arena {
    blocks: Vec<Block>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([f32; 16]);

impl Arena {
    /// An arena of at least `floats` f32 elements.
    pub fn new(floats: usize) -> Arena {
        Arena { blocks: vec![Block([0.0; 16]); floats.div_ceil(16)], len: floats }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base pointer; every offset a program planned is in `0..len()` f32 elements.
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.blocks.as_mut_ptr().cast()
    }

    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `Block` is `repr(C)` over `[f32; 16]`, so the blocks are `16 * blocks.len()`
        // contiguous f32s, of which the first `len` are in bounds.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, with unique access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_is_aligned_and_zeroed() {
        let mut a = Arena::new(37);
        assert_eq!(a.as_mut_ptr() as usize % 64, 0);
        assert_eq!(a.as_slice().len(), 37);
        assert!(a.as_slice().iter().all(|&x| x == 0.0));
        a.as_mut_slice()[36] = 1.0;
        assert_eq!(a.as_slice()[36], 1.0);
    }
}
