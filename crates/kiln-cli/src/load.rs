//! Loading a model: spec source + optional checkpoint -> verified IR graph, with errors
//! rendered as compiler diagnostics.

use kiln_frontend::checkpoint::CheckpointKind;
use kiln_frontend::{Checkpoint, Compiled};
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Model {
    pub compiled: Compiled,
    pub checkpoint: Option<Checkpoint>,
}

/// Reads a spec (and its checkpoint, if given) and compiles it.
pub fn load(spec: &Path, weights: Option<&Path>) -> Result<Model> {
    let source: Arc<str> = std::fs::read_to_string(spec)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot read model spec {}", spec.display()))?
        .into();
    let checkpoint = match weights {
        Some(w) => Some(kiln_frontend::checkpoint::load(w)?),
        None => None,
    };
    let compiled = kiln_frontend::compile(&source, checkpoint.as_ref())
        .map_err(|d| d.with_source(&spec.display().to_string(), source.clone()))?;
    Ok(Model { compiled, checkpoint })
}

/// The tokenizer for a model: `explicit`, or `tokenizer.json` beside the checkpoint, or
/// else the tokenizer stored in the metadata of a GGUF checkpoint.
pub fn tokenizer(explicit: Option<&Path>, checkpoint: Option<&Checkpoint>) -> Result<tokenizers::Tokenizer> {
    let path: PathBuf = match (explicit, checkpoint) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(ck)) => ck.path.with_file_name("tokenizer.json"),
        (None, None) => return Err(miette!("--text needs a tokenizer: pass --tokenizer tokenizer.json")),
    };
    if !path.exists() {
        if let (None, Some(ck)) = (explicit, checkpoint)
            && ck.kind == CheckpointKind::Gguf
        {
            return crate::gguf_tokenizer::from_gguf(ck).wrap_err_with(|| {
                format!("no tokenizer at {} (looked beside the weights), and none usable in the GGUF", path.display())
            });
        }
        return Err(miette!(
            help = "pass --tokenizer PATH/tokenizer.json",
            "no tokenizer at {} (looked beside the weights)",
            path.display()
        ));
    }
    tokenizers::Tokenizer::from_file(&path).map_err(|e| miette!("cannot read tokenizer {}: {e}", path.display()))
}
