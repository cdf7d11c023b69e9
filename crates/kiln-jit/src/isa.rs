//! The host instruction set: a Cranelift `TargetIsa` for the machine we run on, and the
//! features kernels choose their variants by.
//!
//! The ISA always comes from [`cranelift_native::builder`], which probes the CPU (CPUID on
//! x86-64) and enables every extension it finds. Never use a named preset (`znver4`,
//! `x86-64-v3`, ...): in Cranelift 0.135 those leave `has_avx` off, and then `fma` on `f32x4`
//! becomes four calls to libm's `fmaf` (see `../shared/KERNELS.md`).
//!
//! Cranelift's x86-64 backend emits 128-bit vectors only (`f32x4`, `i32x4`, `i16x8`,
//! `i8x16`); AVX and AVX-512 select the VEX/EVEX encodings of those 128-bit instructions
//! (three-operand forms, unaligned memory operands, `vfmadd*`, `vpdpbusd`).

use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use std::fmt;
use std::sync::Arc;

use crate::JitError;

/// Cranelift's optimization level for kernel code.
///
/// Kernels are scheduled by their emitter. At [`OptLevel::Speed`] Cranelift keeps loads in
/// program order but sinks pure operations to their first use, which in a hand-unrolled body
/// lengthens the live ranges of loaded values; at [`OptLevel::None`] the emitter's order is
/// kept as written. Which is faster is measured per kernel family
/// (`examples/linear_timing.rs`), not assumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OptLevel {
    /// `opt_level=none`: no e-graph rewriting; instructions stay in emission order.
    #[default]
    None,
    /// `opt_level=speed`.
    Speed,
}

impl OptLevel {
    fn setting(self) -> &'static str {
        match self {
            OptLevel::None => "none",
            OptLevel::Speed => "speed",
        }
    }
}

/// How to build the host ISA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IsaOptions {
    pub opt_level: OptLevel,
    /// Run Cranelift's IR verifier on every function (20-40% of compile time). On by default
    /// in debug builds of kiln only.
    pub verifier: bool,
    /// Position-independent code, for object files linked into executables and libraries
    /// (calls to libm, e.g. `fmaf` on CPUs without FMA, then go through the PLT instead of
    /// text relocations). The JIT needs none.
    pub pic: bool,
}

// Not derivable: the verifier's default follows `debug_assertions` (clippy sees only the
// release value, `false`).
#[allow(clippy::derivable_impls)]
impl Default for IsaOptions {
    fn default() -> Self {
        IsaOptions { opt_level: OptLevel::default(), verifier: cfg!(debug_assertions), pic: false }
    }
}

/// CPU features of the host ISA, as Cranelift will use them (read back from the ISA's
/// flags, so they are exactly what code generation sees, not a separate CPUID probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct HostFeatures {
    /// SSE4.1 (`pmovzx*`/`pmovsx*` widening, `roundps`, `pinsr*`).
    pub sse41: bool,
    /// AVX: VEX encodings (three-operand forms, unaligned memory operands).
    pub avx: bool,
    pub avx2: bool,
    /// `fma` on `f32x4` lowers to `vfmadd*ps` (otherwise to four libm calls).
    pub fma: bool,
    pub avx512f: bool,
    pub avx512vl: bool,
    /// `vpdpbusd` (EVEX, 128-bit) for u8 x i8 dot products.
    pub avx512vnni: bool,
    /// The VEX encoding of `vpdpbusd`.
    pub avx_vnni: bool,
}

impl HostFeatures {
    fn from_isa(isa: &OwnedTargetIsa) -> Self {
        let flag = |name: &str| isa.isa_flags().iter().any(|v| v.name == name && v.as_bool() == Some(true));
        HostFeatures {
            sse41: flag("has_sse41"),
            avx: flag("has_avx"),
            avx2: flag("has_avx2"),
            fma: flag("has_fma"),
            avx512f: flag("has_avx512f"),
            avx512vl: flag("has_avx512vl"),
            avx512vnni: flag("has_avx512vnni"),
            avx_vnni: flag("has_avx_vnni"),
        }
    }
}

impl fmt::Display for HostFeatures {
    /// `sse4.1 avx avx2 fma -avx512f ...`: every feature kernels care about, `-` when absent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = [
            ("sse4.1", self.sse41),
            ("avx", self.avx),
            ("avx2", self.avx2),
            ("fma", self.fma),
            ("avx512f", self.avx512f),
            ("avx512vl", self.avx512vl),
            ("avx512vnni", self.avx512vnni),
            ("avxvnni", self.avx_vnni),
        ];
        let words: Vec<String> = all.iter().map(|(n, on)| if *on { n.to_string() } else { format!("-{n}") }).collect();
        f.write_str(&words.join(" "))
    }
}

/// The host's Cranelift ISA plus the features read from it. Cheap to clone (the ISA is
/// shared behind an `Arc`).
#[derive(Clone)]
pub struct HostIsa {
    isa: OwnedTargetIsa,
    features: HostFeatures,
    options: IsaOptions,
}

impl HostIsa {
    /// The host ISA with default options (see [`IsaOptions::default`]).
    pub fn native() -> Result<HostIsa, JitError> {
        HostIsa::with_options(IsaOptions::default())
    }

    pub fn with_options(options: IsaOptions) -> Result<HostIsa, JitError> {
        HostIsa::for_cpu("native", options)
    }

    /// The ISA of the host's architecture for the CPU named `cpu`: `native` (this CPU's
    /// features, detected) or one of Cranelift's presets (`x86-64-v3`, `znver3`, `haswell`,
    /// ...), for code compiled ahead of time to run on other machines.
    pub fn for_cpu(cpu: &str, options: IsaOptions) -> Result<HostIsa, JitError> {
        let mut flags = settings::builder();
        let set = |flags: &mut settings::Builder, name: &str, value: &str| {
            flags.set(name, value).map_err(|e| JitError::Isa(format!("setting {name}={value}: {e}")))
        };
        set(&mut flags, "opt_level", options.opt_level.setting())?;
        set(&mut flags, "enable_verifier", if options.verifier { "true" } else { "false" })?;
        // The JIT places code anywhere in the address space and calls no libcalls relative
        // to it (the x64 backend also does not support PIC in the JIT); object files for
        // programs ask for it.
        set(&mut flags, "is_pic", if options.pic { "true" } else { "false" })?;
        set(&mut flags, "use_colocated_libcalls", "false")?;
        // Kernels keep weight panels on the stack (see `linear`): probe large frames inline
        // so a stack overflow hits the guard page instead of jumping over it.
        set(&mut flags, "enable_probestack", "true")?;
        set(&mut flags, "probestack_strategy", "inline")?;
        let native = cranelift_native::builder().map_err(|e| JitError::Isa(format!("host: {e}")))?;
        let isa_builder = match cpu {
            "native" => native,
            preset => {
                let mut b = cranelift_codegen::isa::lookup(native.triple().clone())
                    .map_err(|e| JitError::Isa(format!("host architecture: {e}")))?;
                b.enable(preset).map_err(|_| {
                    JitError::Isa(format!(
                        "unknown target CPU `{preset}`: give `native` or a CPU name such as x86-64-v2, x86-64-v3, x86-64-v4, haswell, skylake, znver3"
                    ))
                })?;
                b
            }
        };
        let isa =
            isa_builder.finish(settings::Flags::new(flags)).map_err(|e| JitError::Isa(format!("host ISA: {e}")))?;
        let features = HostFeatures::from_isa(&isa);
        Ok(HostIsa { isa, features, options })
    }

    /// The target and the CPU features code is compiled for, e.g.
    /// `x86_64-unknown-linux-gnu: sse4.1 avx avx2 fma -avx512f ...`.
    pub fn describe(&self) -> String {
        format!("{}: {}", self.isa.triple(), self.features)
    }

    /// Every CPU feature code for this ISA may use (Cranelift's `has_*` flags that are on,
    /// without the prefix: `sse3`, `avx2`, `fma`, `bmi1`, ...), which a program compiled
    /// ahead of time checks the CPU it runs on for.
    pub fn required_features(&self) -> Vec<String> {
        let on = |v: &cranelift_codegen::settings::Value| v.as_bool() == Some(true);
        self.isa
            .isa_flags()
            .iter()
            .filter(|v| on(v))
            .filter_map(|v| v.name.strip_prefix("has_").map(String::from))
            .collect()
    }

    pub fn features(&self) -> HostFeatures {
        self.features
    }

    pub fn options(&self) -> IsaOptions {
        self.options
    }

    /// The Cranelift ISA, for building modules and signatures.
    pub fn isa(&self) -> &OwnedTargetIsa {
        &self.isa
    }

    pub(crate) fn isa_arc(&self) -> OwnedTargetIsa {
        Arc::clone(&self.isa)
    }
}

impl fmt::Debug for HostIsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostIsa")
            .field("triple", &self.isa.triple().to_string())
            .field("features", &self.features)
            .field("options", &self.options)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_isa_reports_what_cpuid_says() {
        let isa = HostIsa::native().unwrap();
        let f = isa.features();
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(f.avx, std::is_x86_feature_detected!("avx"));
            assert_eq!(f.fma, std::is_x86_feature_detected!("fma"));
            assert_eq!(f.avx2, std::is_x86_feature_detected!("avx2"));
            assert_eq!(f.avx512vnni, std::is_x86_feature_detected!("avx512vnni"));
        }
        eprintln!("host features: {f}");
    }
}
