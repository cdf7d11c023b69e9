//! Layer tying: blocks that share weights. [`similarity`] measures how alike the blocks
//! are, the analysis `kiln analyze --similarity` prints and plots.

pub mod similarity;
