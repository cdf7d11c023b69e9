//! What generation needs of a language model's graph, shared by `kiln generate` and native
//! executables: token ids in, logits out, over a [`crate::KvCache`].

use crate::Value;
use kiln_ir::{DType, Graph, Op};
use std::collections::HashMap;

/// A graph's generation interface: its `input_ids`, the masks filled with ones, and the
/// `logits` output with its vocabulary size.
#[derive(Clone, Debug)]
pub struct LanguageModel {
    pub ids: String,
    /// Inputs filled with ones (attention masks).
    pub masks: Vec<String>,
    pub logits: String,
    pub vocab: usize,
}

/// Why a graph cannot generate text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotLanguageModel(pub String);

impl NotLanguageModel {
    /// What a language model must have.
    pub const HELP: &str =
        "generation needs an input `input_ids: i64[batch, seq]` and an output `logits: f32[batch, seq, vocab]`";
}

impl LanguageModel {
    /// Checks that `graph` is a language model: an i64 `input_ids: [batch, seq]` input (and
    /// optionally `attention_mask`s of the same type) and an f32
    /// `logits: [batch, seq, vocab]` output.
    pub fn of(graph: &Graph) -> Result<LanguageModel, NotLanguageModel> {
        let mut ids = None;
        let mut masks = Vec::new();
        for id in graph.inputs() {
            let node = graph.node(id);
            let Op::Input { name } = &node.op else { continue };
            match (name.as_str(), node.ty.dtype, node.ty.rank()) {
                ("input_ids", DType::I64, 2) => ids = Some(name.clone()),
                ("attention_mask", DType::I64, 2) => masks.push(name.clone()),
                _ => {
                    return Err(NotLanguageModel(format!(
                        "the model's input `{name}: {}` cannot be filled during generation",
                        node.ty
                    )));
                }
            }
        }
        let ids = ids.ok_or_else(|| NotLanguageModel("the model has no `input_ids` input".into()))?;
        let (_, out) = graph
            .outputs()
            .iter()
            .find(|(name, _)| name == "logits")
            .ok_or_else(|| NotLanguageModel("the model has no `logits` output".into()))?;
        let ty = &graph.node(*out).ty;
        let vocab = match ty.shape.as_slice() {
            [_, _, v] if ty.dtype == DType::F32 => v.known(),
            _ => None,
        }
        .filter(|&v| v > 0)
        .ok_or_else(|| NotLanguageModel(format!("`logits` is {ty}, not f32[batch, seq, vocab]")))?;
        Ok(LanguageModel { ids, masks, logits: "logits".into(), vocab: vocab as usize })
    }

    /// The inputs that feed `ids` to one sequence after its tokens so far.
    pub fn step_inputs(&self, ids: &[i64]) -> HashMap<String, Value> {
        let shape = vec![1, ids.len()];
        let mut inputs = HashMap::new();
        inputs.insert(self.ids.clone(), Value::I64 { shape: shape.clone(), data: ids.to_vec() });
        for m in &self.masks {
            inputs.insert(m.clone(), Value::I64 { shape: shape.clone(), data: vec![1; ids.len()] });
        }
        inputs
    }

    /// The logits at the last position of a step's outputs, if the model produced them.
    pub fn last_logits(&self, outputs: Vec<(String, Value)>) -> Option<Vec<f32>> {
        let (_, logits) = outputs.into_iter().find(|(n, _)| *n == self.logits)?;
        let logits = logits.as_f32()?;
        let last = (logits.data.len() / self.vocab).checked_sub(1)?;
        Some(logits.data[last * self.vocab..][..self.vocab].to_vec())
    }

    /// Whether `id` is a token of the vocabulary.
    pub fn is_token(&self, id: i64) -> bool {
        id >= 0 && (id as u64) < self.vocab as u64
    }

    /// Checks a prompt: at least one token, every one in the vocabulary.
    pub fn check_prompt(&self, prompt: &[i64]) -> Result<(), String> {
        if prompt.is_empty() {
            return Err("the prompt has no tokens".into());
        }
        match prompt.iter().find(|&&i| !self.is_token(i)) {
            Some(bad) => Err(format!("prompt token id {bad} is outside the vocabulary (0..{})", self.vocab)),
            None => Ok(()),
        }
    }
}

/// Token ids written `1,2,3` (as `--prompt-ids` takes them; empty items are skipped).
pub fn parse_ids(s: &str) -> Result<Vec<i64>, String> {
    s.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().parse::<i64>().map_err(|_| format!("--prompt-ids: `{t}` is not a token id")))
        .collect()
}

/// Greedy decoding's choice: the first maximum, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> i64 {
    logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best }) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ties go to the first maximum; a NaN after the first position never wins.
    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[0.5, f32::NAN, 2.0, -1.0]), 2);
        assert_eq!(argmax(&[-2.0]), 0);
    }
}
