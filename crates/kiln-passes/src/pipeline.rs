//! Pass pipelines as users write them: `quantize(bits=4.5, method=gptq)`, several calls
//! separated by commas or semicolons, run in order. [`REGISTRY`] maps each name to its
//! [`Pass`]; a new pass is one file and one entry there.

use crate::PassError;
use crate::calibration::Calibration;
use crate::quantize::{self, Activations, Choice, Method, QuantizeOptions, QuantizeReport, Target};

/// One call of a pass: its name and `key=value` arguments as written.
#[derive(Clone, Debug, PartialEq)]
pub struct PassCall {
    pub name: String,
    pub args: Vec<(String, String)>,
}

impl std::fmt::Display for PassCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let args: Vec<String> = self.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{}({})", self.name, args.join(", "))
    }
}

/// A pipeline that does not parse: what is wrong, and the byte offset in the text.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct PipelineError {
    pub message: String,
    pub offset: usize,
}

/// Parses `name(key=value, ...)` calls separated by `,` or `;` (the parentheses are
/// optional for a pass without arguments).
pub fn parse(text: &str) -> Result<Vec<PassCall>, PipelineError> {
    let err = |offset: usize, message: String| PipelineError { message, offset };
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut calls = Vec::new();
    let skip = |i: &mut usize| {
        while *i < bytes.len() && (bytes[*i] as char).is_whitespace() {
            *i += 1;
        }
    };
    let word = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && (bytes[*i].is_ascii_alphanumeric() || b"_.-*?".contains(&bytes[*i])) {
            *i += 1;
        }
        &text[start..*i]
    };
    loop {
        skip(&mut i);
        if i == bytes.len() {
            break;
        }
        let at = i;
        let name = word(&mut i);
        if name.is_empty() {
            return Err(err(
                at,
                format!("expected a pass name, found `{}`", &text[at..].chars().next().unwrap_or(' ')),
            ));
        }
        let mut args = Vec::new();
        skip(&mut i);
        if i < bytes.len() && bytes[i] == b'(' {
            i += 1;
            loop {
                skip(&mut i);
                if i < bytes.len() && bytes[i] == b')' {
                    i += 1;
                    break;
                }
                let at = i;
                let key = word(&mut i);
                skip(&mut i);
                if key.is_empty() || i >= bytes.len() || bytes[i] != b'=' {
                    return Err(err(at, format!("expected `key=value` in the arguments of {name}")));
                }
                i += 1;
                skip(&mut i);
                let at = i;
                let value = word(&mut i);
                if value.is_empty() {
                    return Err(err(at, format!("expected a value for `{key}`")));
                }
                args.push((key.to_string(), value.to_string()));
                skip(&mut i);
                match bytes.get(i) {
                    Some(b',') => i += 1,
                    Some(b')') => {}
                    _ => return Err(err(i, format!("expected `,` or `)` in the arguments of {name}"))),
                }
            }
        }
        calls.push(PassCall { name: name.to_string(), args });
        skip(&mut i);
        match bytes.get(i) {
            None => break,
            Some(b',' | b';') => i += 1,
            Some(_) => return Err(err(i, "expected `,` or `;` between passes".into())),
        }
    }
    if calls.is_empty() {
        return Err(err(0, "no passes given".into()));
    }
    Ok(calls)
}

/// What passes get besides the graph and their arguments.
pub struct Context<'a> {
    pub calibration: Option<&'a Calibration>,
    /// Measures how far a changed graph's outputs move (see [`quantize::Probe`]).
    pub probe: Option<&'a quantize::Probe<'a>>,
    /// `--override PATTERN=FORMAT`, for passes that choose formats.
    pub overrides: Vec<(String, Choice)>,
    pub progress: &'a (dyn Fn(usize, usize, &str) + Sync),
}

/// What a pass reports about its work.
#[derive(Clone, Debug, PartialEq)]
pub enum PassReport {
    Quantize(QuantizeReport),
}

/// A pass a pipeline may name.
pub struct Pass {
    pub name: &'static str,
    pub run: fn(&mut kiln_ir::Graph, &PassCall, &Context) -> Result<PassReport, PassError>,
    /// Whether this call measures changed models end to end through [`Context::probe`],
    /// which needs calibration rows held out from the statistics.
    pub probes: fn(&PassCall) -> bool,
    /// One line of help.
    pub help: &'static str,
}

/// Every pass a pipeline may name.
pub const REGISTRY: &[Pass] = &[Pass {
    name: "quantize",
    run: run_quantize,
    probes: quantize_probes,
    help: "quantize(bits=B | format=F [, method=rtn|gptq] [, act_order=true|false] [, damp=0.01] [, clip=true|false] [, activations=int8|int8-block|int8-row] [, lorc_rank=R]): store matrices in fewer bits; activations=int8 runs linears W8A8 with activation scales per block of 32 or per row, whichever a probe on held-out --calib rows measures closer to the model",
}];

fn pass(call: &PassCall) -> Result<&'static Pass, PassError> {
    REGISTRY.iter().find(|p| p.name == call.name).ok_or_else(|| {
        let known: Vec<&str> = REGISTRY.iter().map(|p| p.name).collect();
        PassError::NotApplicable {
            pass: "pipeline",
            message: format!("unknown pass `{}` (known: {})", call.name, known.join(", ")),
        }
    })
}

/// Runs `calls` in order on `graph`.
pub fn run(graph: &mut kiln_ir::Graph, calls: &[PassCall], ctx: &Context) -> Result<Vec<PassReport>, PassError> {
    calls.iter().map(|call| (pass(call)?.run)(graph, call, ctx)).collect()
}

/// Whether any of `calls` probes (see [`Pass::probes`]); unknown passes do not (running
/// them fails).
pub fn probes(calls: &[PassCall]) -> bool {
    calls.iter().any(|call| pass(call).is_ok_and(|p| (p.probes)(call)))
}

/// Budgets probe each kind of layer and the mix; `activations=int8` probes per-block
/// against per-row scales.
fn quantize_probes(call: &PassCall) -> bool {
    quantize_options(call, true).is_ok_and(|o| matches!(o.target, Target::Bits(_)) || o.measure_activations)
}

fn run_quantize(graph: &mut kiln_ir::Graph, call: &PassCall, ctx: &Context) -> Result<PassReport, PassError> {
    let options =
        QuantizeOptions { overrides: ctx.overrides.clone(), ..quantize_options(call, ctx.calibration.is_some())? };
    quantize::quantize(graph, &options, ctx.calibration, ctx.probe, ctx.progress).map(PassReport::Quantize)
}

/// The options a `quantize(...)` call names (no overrides), for a model with calibration
/// inputs or without.
fn quantize_options(call: &PassCall, calibrated: bool) -> Result<QuantizeOptions, PassError> {
    let fail = |message: String| PassError::NotApplicable { pass: "quantize", message };
    let mut target = None;
    let mut method = if calibrated { Method::Gptq } else { Method::Rtn };
    // Act-order by default: on SmolLM2 int4g64a it took held-out perplexity from 1.254x to
    // 1.161x of the unquantized model's, for 20% more time.
    // Searched scales by default: on SmolLM2 int4g64a they took GPTQ from 1.161x to 1.089x,
    // and round-to-nearest from 1.325x to 1.145x.
    let mut gptq = crate::gptq::GptqOptions { act_order: true, clip: true, ..Default::default() };
    let (mut activations, mut measure_activations) = (Activations::F32, false);
    let mut lorc_rank = 0;
    for (key, value) in &call.args {
        let bad = |what: &str| fail(format!("{key}={value}: expected {what}"));
        match key.as_str() {
            "bits" => {
                let bits: f64 = value.parse().map_err(|_| bad("a number of bits per weight"))?;
                if !(1.0..=32.0).contains(&bits) {
                    return Err(bad("between 1 and 32 bits per weight"));
                }
                target = Some(Target::Bits(bits));
            }
            "format" => target = Some(Target::Format(value.parse().map_err(|e: String| fail(e))?)),
            "method" => {
                method = match value.as_str() {
                    "rtn" => Method::Rtn,
                    "gptq" => Method::Gptq,
                    _ => return Err(bad("rtn or gptq")),
                }
            }
            "act_order" => gptq.act_order = value.parse().map_err(|_| bad("true or false"))?,
            "damp" => gptq.damp = value.parse().map_err(|_| bad("a number such as 0.01"))?,
            "clip" => gptq.clip = value.parse().map_err(|_| bad("true or false"))?,
            "lorc_rank" => {
                lorc_rank = value
                    .parse()
                    .ok()
                    .filter(|r| (1..=1024).contains(r))
                    .ok_or_else(|| bad("a rank from 1 to 1024"))?;
            }
            "activations" => {
                (activations, measure_activations) = match value.as_str() {
                    "int8" => (Activations::Int8, true),
                    "int8-block" => (Activations::Int8, false),
                    "int8-row" => (Activations::Int8Row, false),
                    "f32" => (Activations::F32, false),
                    _ => return Err(bad("int8, int8-block, int8-row or f32")),
                }
            }
            _ => {
                return Err(fail(format!(
                    "unknown argument `{key}` (quantize takes bits, format, method, act_order, damp, clip, activations, lorc_rank)"
                )));
            }
        }
    }
    let target = target.ok_or_else(|| fail("give bits=B (a budget) or format=F (one format for all)".into()))?;
    if lorc_rank > 0 && !calibrated {
        return Err(fail("lorc_rank fits corrections to the calibration inputs: pass --calib".into()));
    }
    if method == Method::Gptq && !calibrated {
        return Err(fail("method=gptq needs calibration data: pass --calib".into()));
    }
    Ok(QuantizeOptions { target, method, overrides: Vec::new(), gptq, activations, measure_activations, lorc_rank })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelines_parse_with_arguments_and_positions() {
        let calls = parse(" quantize(bits=4.5, method=gptq) ; quantize(format=int4g64a)").unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].to_string(), "quantize(bits=4.5, method=gptq)");
        assert_eq!(calls[1].args, vec![("format".to_string(), "int4g64a".to_string())]);
        assert_eq!(parse("quantize(bits 4)").unwrap_err().offset, 9);
        assert_eq!(parse("quantize(bits=4").unwrap_err().offset, 15);
        assert!(parse("").is_err());
        assert!(parse("a b").is_err());
    }

    /// Budgets and `activations=int8` probe; forced formats, forced activation scales and
    /// unknown passes do not.
    #[test]
    fn the_passes_say_whether_they_probe() {
        let probes = |text: &str| probes(&parse(text).unwrap());
        assert!(probes("quantize(bits=4.5)"));
        assert!(probes("quantize(format=int8, activations=int8)"));
        assert!(probes("quantize(format=int4g64a); quantize(bits=8.5, method=rtn)"));
        assert!(!probes("quantize(format=int4g64a)"));
        assert!(!probes("quantize(format=int8, activations=int8-row)"));
        assert!(!probes("quantize(format=int8, activations=int8-block)"));
        assert!(!probes("prune(sparsity=0.5)"));
    }
}
