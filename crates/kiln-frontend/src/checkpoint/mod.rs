//! Checkpoint readers: safetensors and GGUF files, memory-mapped into a [`TensorStore`].
//!
//! [`load`] recognizes the file by its first bytes (not its extension), validates the
//! header against the file size and returns a [`Checkpoint`]: the usable weight tensors,
//! whose bytes borrow from a single shared memory map (nothing is copied), plus the
//! file's metadata. Tensors whose element type kiln cannot use as a weight (an `I64`
//! index buffer, a `Q6_K` matrix, ...) are not loaded but listed in
//! [`Checkpoint::skipped`], so that [`Checkpoint::require`] can say why a tensor the
//! model needs is unavailable.
//!
//! Every malformed input yields a [`CheckpointError`] naming the file (and the tensor
//! where there is one); no input bytes can make the readers panic, overflow or allocate
//! more than the file size warrants.
//!
//! Shapes are kiln shapes: row-major, outermost dimension first. For safetensors that is
//! the stored shape; GGUF lists dimensions innermost first, so its `ne` is reversed.

mod gguf;
mod safetensors;

use kiln_ir::{Bytes, TensorData, TensorStore};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The container format of a checkpoint file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckpointKind {
    /// A Hugging Face safetensors file.
    Safetensors,
    /// A GGUF file (llama.cpp), version 2 or 3.
    Gguf,
}

impl fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointKind::Safetensors => "safetensors",
            CheckpointKind::Gguf => "GGUF",
        })
    }
}

/// A metadata value: a safetensors `__metadata__` string or a GGUF key/value.
///
/// GGUF unsigned integers of every width become [`MetaValue::UInt`], signed ones
/// [`MetaValue::Int`], `f32`/`f64` become [`MetaValue::Float`].
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    Str(String),
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Array(Vec<MetaValue>),
}

/// A loaded checkpoint: its weight tensors and metadata.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The file the checkpoint was read from.
    pub path: PathBuf,
    /// The container format.
    pub kind: CheckpointKind,
    /// The tensors kiln can use as weights, by name. Their bytes borrow from one shared
    /// memory map of the file.
    pub tensors: TensorStore,
    /// Safetensors `__metadata__` strings, or the GGUF key/value pairs.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensors present in the file but not loaded because kiln cannot use their element
    /// type as a weight: `(name, dtype)`, with the dtype as the file names it
    /// (safetensors `"I64"`, GGUF `"Q6_K"`).
    pub skipped: Vec<(String, String)>,
}

/// Why a checkpoint could not be read, or a tensor could not be taken from it.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum CheckpointError {
    /// The file could not be opened or memory-mapped.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The file is neither a GGUF nor a safetensors file.
    #[error("{} is not a checkpoint: {reason}", path.display())]
    #[diagnostic(help("kiln reads safetensors and GGUF (version 2 or 3) files"))]
    NotACheckpoint { path: PathBuf, reason: String },

    /// Part of the file that the header describes lies past its end.
    #[error(
        "{} is truncated: {what} occupies bytes {start}..{end}, but the file is only {file_size} bytes",
        path.display()
    )]
    #[diagnostic(help("the download or copy of this file is probably incomplete"))]
    Truncated {
        path: PathBuf,
        /// What lies past the end: `the JSON header`, `the data of tensor `x``, ...
        what: String,
        start: u64,
        end: u64,
        file_size: u64,
    },

    /// The header is malformed: bad JSON, an unknown dtype, a shape that disagrees with
    /// the tensor's byte length, ...
    #[error("{} has a corrupt {kind} header: {reason}", path.display())]
    CorruptHeader { path: PathBuf, kind: CheckpointKind, reason: String },

    /// The GGUF version is not 2 or 3.
    #[error(
        "{} is GGUF version {version}, which kiln cannot read (supported: versions 2 and 3){}",
        path.display(),
        gguf::version_hint(*version)
    )]
    UnsupportedGgufVersion { path: PathBuf, version: u32 },

    /// The tensor exists, but its element type is not one kiln can use as a weight.
    #[error(
        "tensor `{name}` in {} has dtype {dtype}, which kiln cannot use as a weight (supported: {})",
        path.display(),
        supported.join(", ")
    )]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String, supported: &'static [&'static str] },

    /// The checkpoint has no tensor of that name.
    #[error("{} has no tensor named `{name}`{}", path.display(), did_you_mean(nearest))]
    MissingTensor {
        path: PathBuf,
        name: String,
        /// Up to three names sharing the longest prefix with `name`.
        nearest: Vec<String>,
    },
}

fn did_you_mean(nearest: &[String]) -> String {
    if nearest.is_empty() {
        return String::new();
    }
    let names: Vec<String> = nearest.iter().map(|n| format!("`{n}`")).collect();
    format!("; did you mean {}?", names.join(" or "))
}

/// Reads the checkpoint at `path`, recognizing GGUF or safetensors by the first bytes.
///
/// The file is memory-mapped; the returned tensors refer to the map, which stays alive
/// as long as any of them does. As with any memory map, the file must not be modified
/// while it is in use.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let open_error = |source| CheckpointError::Open { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(open_error)?;
    let file_len = file.metadata().map_err(open_error)?.len();
    if file_len == 0 {
        return Err(CheckpointError::NotACheckpoint { path: path.to_path_buf(), reason: "the file is empty".into() });
    }
    // SAFETY: the map is read-only; as documented above, the file must not be modified
    // while the checkpoint is alive.
    let map = unsafe { Mmap::map(&file) }.map_err(open_error)?;
    let data = Bytes::new(Arc::new(map));
    let head = data.as_slice();
    if head.starts_with(b"GGUF") {
        gguf::read(path, data)
    } else if head.get(8) == Some(&b'{') {
        safetensors::read(path, data)
    } else {
        Err(CheckpointError::NotACheckpoint { path: path.to_path_buf(), reason: describe_unknown_magic(head) })
    }
}

/// Explains what a file with an unrecognized start might be.
fn describe_unknown_magic(head: &[u8]) -> String {
    let shown = &head[..head.len().min(8)];
    let hex: Vec<String> = shown.iter().map(|b| format!("{b:02x}")).collect();
    let guess = if head.starts_with(b"version https://git-lfs") {
        "; it is a Git LFS pointer, not the model itself (run `git lfs pull`)"
    } else if head.starts_with(b"PK\x03\x04") {
        "; it looks like a zip archive, e.g. a PyTorch `.bin`/`.pt` file (convert it to safetensors)"
    } else if [b"lmgg", b"fmgg", b"tjgg", b"algg"].iter().any(|m| head.starts_with(*m)) {
        "; it looks like a legacy GGML/GGJT file (convert it to GGUF)"
    } else if head.len() < 9 {
        "; the file is too short to hold a checkpoint header"
    } else {
        ""
    };
    format!(
        "it starts with bytes [{}], which is neither the GGUF magic `GGUF` nor a safetensors header{guess}",
        hex.join(" ")
    )
}

impl Checkpoint {
    /// The tensor `name`, or an error saying why it is unavailable: it was skipped for
    /// its dtype ([`CheckpointError::UnsupportedDtype`]) or does not exist
    /// ([`CheckpointError::MissingTensor`], with similarly named tensors suggested).
    pub fn require(&self, name: &str) -> Result<&TensorData, CheckpointError> {
        if let Some(tensor) = self.tensors.get(name) {
            return Ok(tensor);
        }
        if let Some((_, dtype)) = self.skipped.iter().find(|(n, _)| n == name) {
            return Err(CheckpointError::UnsupportedDtype {
                path: self.path.clone(),
                name: name.to_string(),
                dtype: dtype.clone(),
                supported: self.supported_dtypes(),
            });
        }
        Err(CheckpointError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
            nearest: self.nearest_names(name),
        })
    }

    /// The dtypes, as this container names them, that kiln loads as weights.
    pub fn supported_dtypes(&self) -> &'static [&'static str] {
        match self.kind {
            CheckpointKind::Safetensors => safetensors::SUPPORTED,
            CheckpointKind::Gguf => gguf::SUPPORTED,
        }
    }

    /// Up to three tensor names (loaded or skipped) sharing the longest non-empty common
    /// prefix with `name`, in name order.
    fn nearest_names(&self, name: &str) -> Vec<String> {
        let candidates = self.tensors.iter().map(|(n, _)| n).chain(self.skipped.iter().map(|(n, _)| n.as_str()));
        let mut best: Vec<&str> = Vec::new();
        let mut best_len = 1; // require at least one shared character
        for candidate in candidates {
            let len = common_prefix_chars(name, candidate);
            if len > best_len {
                best_len = len;
                best.clear();
            }
            if len == best_len {
                best.push(candidate);
            }
        }
        best.sort_unstable();
        best.dedup();
        best.into_iter().take(3).map(str::to_string).collect()
    }

    /// The metadata string at `key`, if it is a string.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key)? {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The metadata integer at `key`, if it is a non-negative integer (of any GGUF width
    /// or signedness). Strings are not parsed.
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        match *self.metadata.get(key)? {
            MetaValue::UInt(v) => Some(v),
            MetaValue::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The metadata number at `key` as an `f64`, if it is a float or an integer. Strings
    /// are not parsed.
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        match *self.metadata.get(key)? {
            MetaValue::Float(v) => Some(v),
            MetaValue::UInt(v) => Some(v as f64),
            MetaValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }
}

/// The number of leading characters `a` and `b` share.
fn common_prefix_chars(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh path in the system temp dir; the file is removed when the guard drops.
    pub struct TempFile(pub PathBuf);

    impl TempFile {
        pub fn new(name: &str) -> TempFile {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let unique = format!("kiln-ckpt-{}-{n}-{name}", std::process::id());
            TempFile(std::env::temp_dir().join(unique))
        }

        pub fn write(name: &str, bytes: &[u8]) -> TempFile {
            let file = TempFile::new(name);
            std::fs::write(&file.0, bytes).expect("write temp file");
            file
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::TempFile;
    use super::*;

    #[test]
    fn missing_file_names_the_path() {
        let path = std::env::temp_dir().join("kiln-no-such-checkpoint.safetensors");
        let err = load(&path).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("cannot open {}: ", path.display())), "{msg}");
    }

    #[test]
    fn unknown_magic_is_not_a_checkpoint() {
        for (bytes, hint) in [
            (&b""[..], "empty"),
            (b"hello", "too short"),
            (b"PK\x03\x04 some zip archive", "zip"),
            (b"version https://git-lfs.github.com/spec/v1\n", "Git LFS"),
            (b"0123456789abcdef", "neither"),
        ] {
            let file = TempFile::write("magic.bin", bytes);
            let err = load(&file.0).unwrap_err();
            assert!(matches!(err, CheckpointError::NotACheckpoint { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&file.0.display().to_string()) && msg.contains(hint), "{msg}");
        }
    }

    #[test]
    fn nearest_names_share_the_longest_prefix() {
        let mut tensors = TensorStore::new();
        for name in ["a.weight", "a.bias", "b.weight", "a.norm", "a.proj", "c"] {
            tensors.insert(name, TensorData::from_f32(vec![1], &[0.0]));
        }
        let ckpt = Checkpoint {
            path: "m.safetensors".into(),
            kind: CheckpointKind::Safetensors,
            tensors,
            metadata: BTreeMap::new(),
            skipped: vec![("a.ids".into(), "I64".into())],
        };
        assert_eq!(ckpt.nearest_names("a.wieght"), ["a.weight"]);
        assert_eq!(ckpt.nearest_names("a.x"), ["a.bias", "a.ids", "a.norm"]);
        assert!(ckpt.nearest_names("zzz").is_empty());
        let err = ckpt.require("a.wieght").unwrap_err().to_string();
        assert_eq!(err, "m.safetensors has no tensor named `a.wieght`; did you mean `a.weight`?");
        let err = ckpt.require("a.ids").unwrap_err().to_string();
        assert_eq!(
            err,
            "tensor `a.ids` in m.safetensors has dtype I64, which kiln cannot use as a weight \
             (supported: F32, F16, BF16)"
        );
    }
}
