//! Compiler-style diagnostics for model files, rendered by miette with the source line
//! and a caret under the offending span.

use kiln_ir::Span;
use miette::{LabeledSpan, NamedSource, SourceSpan};
use std::sync::Arc;

/// An error located in a model file. Attach the source with [`Diagnostic::with_source`]
/// to render `file:line:col`, the line and a caret.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error("{message}")]
pub struct Diagnostic {
    pub message: String,
    #[label(primary, "{label}")]
    pub span: SourceSpan,
    pub label: String,
    /// Further places that explain the error, such as an earlier definition.
    #[label(collection)]
    pub related: Vec<LabeledSpan>,
    #[help]
    pub help: Option<String>,
    #[source_code]
    pub source_code: Option<NamedSource<Arc<str>>>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>, span: Span, label: impl Into<String>) -> Diagnostic {
        Diagnostic {
            message: message.into(),
            span: (span.start as usize, (span.end - span.start) as usize).into(),
            label: label.into(),
            related: Vec::new(),
            help: None,
            source_code: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// Adds a secondary label at `span`.
    pub fn with_label(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        let len = (span.end - span.start) as usize;
        self.related.push(LabeledSpan::new(Some(label.into()), span.start as usize, len));
        self
    }

    pub fn with_source(mut self, name: &str, source: Arc<str>) -> Diagnostic {
        self.source_code = Some(NamedSource::new(name, source).with_language("kiln"));
        self
    }

    /// `line:col` (1-based) of the start of the span in `source`.
    pub fn line_col(&self, source: &str) -> (usize, usize) {
        let before = &source[..self.span.offset().min(source.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
        (line, col)
    }
}
