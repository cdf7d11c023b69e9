//! Loading a model: a spec (with an optional checkpoint) compiled to a verified IR graph,
//! or a compiled artifact read back; errors rendered as compiler diagnostics.

use kiln_frontend::Checkpoint;
use kiln_frontend::checkpoint::CheckpointKind;
use kiln_ir::Graph;
use kiln_rt::artifact;
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Metadata keys the CLI adds to artifacts.
pub use kiln_rt::artifact::{EOS_KEY, SOURCE_KEY, TOKENIZER_KEY};

pub struct Model {
    pub graph: Graph,
    /// Checkpoint tensors the spec does not use (reported by `check`).
    pub unused_tensors: Vec<String>,
    pub origin: Origin,
}

/// Where a model came from, for what the graph does not say (tokenizer, end of sequence).
pub enum Origin {
    Spec { checkpoint: Option<Checkpoint> },
    Artifact { path: PathBuf, metadata: BTreeMap<String, String> },
}

/// Reads a spec (and its checkpoint, if given) and compiles it, or reads an artifact.
pub fn load(path: &Path, weights: Option<&Path>) -> Result<Model> {
    if artifact::looks_like_artifact(path) {
        if let Some(w) = weights {
            return Err(miette!(
                help = "drop --weights to run the artifact, or pass the model spec (.kiln source) with --weights",
                "{} is a compiled artifact, which carries its own weights; --weights {} would be ignored",
                path.display(),
                w.display()
            ));
        }
        let a = artifact::read(path).into_diagnostic()?;
        return Ok(Model {
            graph: a.graph,
            unused_tensors: vec![],
            origin: Origin::Artifact { path: path.to_path_buf(), metadata: a.metadata },
        });
    }
    let source: Arc<str> = std::fs::read_to_string(path)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot read model spec {}", path.display()))?
        .into();
    let checkpoint = match weights {
        Some(w) => Some(kiln_frontend::checkpoint::load(w)?),
        None => None,
    };
    let compiled = kiln_frontend::compile(&source, checkpoint.as_ref())
        .map_err(|d| d.with_source(&path.display().to_string(), source.clone()))?;
    Ok(Model { graph: compiled.graph, unused_tensors: compiled.unused_tensors, origin: Origin::Spec { checkpoint } })
}

/// [`load`] for commands that run the model: a spec needs weights.
pub fn load_runnable(path: &Path, weights: Option<&Path>) -> Result<Model> {
    if !path.exists() {
        return Err(miette!("cannot read {}: no such file", path.display()));
    }
    if weights.is_none() && !artifact::looks_like_artifact(path) {
        return Err(miette!(
            help = "pass --weights CHECKPOINT (safetensors or GGUF), or a compiled artifact from `kiln compile`",
            "{} is a model spec: running it needs its weights",
            path.display()
        ));
    }
    load(path, weights)
}

impl Model {
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        match &self.origin {
            Origin::Spec { checkpoint } => checkpoint.as_ref(),
            Origin::Artifact { .. } => None,
        }
    }

    pub fn is_artifact(&self) -> bool {
        matches!(self.origin, Origin::Artifact { .. })
    }

    /// The tokenizer: `explicit`; else the one stored in an artifact; else `tokenizer.json`
    /// beside the checkpoint; else the one in a GGUF checkpoint's metadata.
    pub fn tokenizer(&self, explicit: Option<&Path>) -> Result<tokenizers::Tokenizer> {
        if let Some(p) = explicit {
            return tokenizers::Tokenizer::from_file(p)
                .map_err(|e| miette!("cannot read tokenizer {}: {e}", p.display()));
        }
        let ck = match &self.origin {
            Origin::Artifact { path, metadata } => {
                let json = metadata.get(TOKENIZER_KEY).ok_or_else(|| {
                    miette!(
                        help = "pass --tokenizer PATH/tokenizer.json, or compile the artifact with --tokenizer",
                        "the artifact {} holds no tokenizer",
                        path.display()
                    )
                })?;
                return json.parse().map_err(|e| miette!("the tokenizer stored in {} is damaged: {e}", path.display()));
            }
            Origin::Spec { checkpoint: None } => {
                return Err(miette!("text needs a tokenizer: pass --tokenizer tokenizer.json"));
            }
            Origin::Spec { checkpoint: Some(ck) } => ck,
        };
        let path = ck.path.with_file_name("tokenizer.json");
        if !path.exists() {
            if ck.kind == CheckpointKind::Gguf {
                return crate::gguf_tokenizer::from_gguf(ck).wrap_err_with(|| {
                    format!(
                        "no tokenizer at {} (looked beside the weights), and none usable in the GGUF",
                        path.display()
                    )
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

    /// The end-of-sequence token, when the checkpoint (GGUF) or the artifact names one.
    pub fn eos_token_id(&self) -> Option<i64> {
        match &self.origin {
            Origin::Spec { checkpoint } => {
                checkpoint.as_ref()?.meta_u64("tokenizer.ggml.eos_token_id").map(|e| e as i64)
            }
            Origin::Artifact { metadata, .. } => metadata.get(EOS_KEY)?.parse().ok(),
        }
    }
}
