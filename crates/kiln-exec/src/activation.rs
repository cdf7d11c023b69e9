//! The activations fused kernels apply to their sums; their numbers are the reference
//! interpreter's (`kiln-interp`), computed as `kiln-jit`'s `math` module states.

/// The activation a fused kernel applies to its result (before the residual add).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    #[default]
    None,
    Relu,
    Silu,
    Gelu,
}

impl Activation {
    pub const ALL: [Activation; 4] = [Activation::None, Activation::Relu, Activation::Silu, Activation::Gelu];

    pub fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
        }
    }
}
