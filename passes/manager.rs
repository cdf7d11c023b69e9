//! Pipelines as users write them, and running them. `quantize(bits=4.5, method=gptq)`:
//! several calls separated by commas or semicolons, run in order. [`REGISTRY`] maps each
//! name to its [`Entry`]; a new pass is one file and one entry there. The manager verifies
//! the graph after every pass and can show it to a caller after each one (`kiln ir
//! --print-after`).

use crate::options::{Args, OptionHelp, Options};
use crate::{Context, Pass, PassError, PassReport};
use kiln_ir::Graph;

/// One call of a pass: its name and `key=value` arguments as written.
#[derive(Clone, Debug, PartialEq)]
pub struct PassCall {
    pub name: String,
    pub args: Vec<(String, String)>,
}

impl std::fmt::Display for PassCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.args.is_empty() {
            return f.write_str(&self.name);
        }
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
        while *i < bytes.len() && (bytes[*i].is_ascii_alphanumeric() || b"_.-*?:".contains(&bytes[*i])) {
            *i += 1;
        }
        &text[start..*i]
    };
    // A list value, `[...]` with nested brackets, as written.
    let bracketed = |i: &mut usize| -> Result<&str, PipelineError> {
        let (start, mut depth) = (*i, 0usize);
        while *i < bytes.len() {
            match bytes[*i] {
                b'[' => depth += 1,
                b']' => depth -= 1,
                b'(' | b')' | b';' => break,
                _ => {}
            }
            *i += 1;
            if depth == 0 {
                return Ok(&text[start..*i]);
            }
        }
        Err(err(start, "a `[` without its `]`".into()))
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
                let value = if bytes.get(i) == Some(&b'[') { bracketed(&mut i)? } else { word(&mut i) };
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

/// A pass as the registry holds it: its name, help and options table, and its options
/// parser and rewrite behind plain function pointers (see [`entry`]).
pub struct Entry {
    pub name: &'static str,
    pub summary: &'static str,
    pub options: &'static [OptionHelp],
    /// How the pass checks an override's value, if it takes overrides.
    pub overrides: Option<crate::OverrideCheck>,
    run: fn(&mut Graph, &PassCall, &Context) -> Result<PassReport, PassError>,
    check: fn(&PassCall, bool) -> Result<(), PassError>,
    probes: fn(&PassCall) -> bool,
}

/// The registry entry of pass `P`.
pub const fn entry<P: Pass>() -> Entry {
    Entry {
        name: P::NAME,
        summary: P::SUMMARY,
        options: P::Options::HELP,
        overrides: P::OVERRIDES,
        run: run_pass::<P>,
        check: check_pass::<P>,
        probes: probes::<P>,
    }
}

fn parse_options<P: Pass>(call: &PassCall, calibrated: bool) -> Result<P::Options, PassError> {
    P::Options::parse(&mut Args::new(P::NAME, P::Options::HELP, call, calibrated)?)
}

fn check_pass<P: Pass>(call: &PassCall, calibrated: bool) -> Result<(), PassError> {
    parse_options::<P>(call, calibrated).map(|_| ())
}

fn run_pass<P: Pass>(graph: &mut Graph, call: &PassCall, ctx: &Context) -> Result<PassReport, PassError> {
    let options = parse_options::<P>(call, ctx.calibrated())?;
    P::run(graph, &options, ctx)
}

/// With calibration (the only case where a call can probe).
fn probes<P: Pass>(call: &PassCall) -> bool {
    parse_options::<P>(call, true).is_ok_and(|o| P::probes(&o))
}

/// Every pass a pipeline may name, in the order `kiln passes` lists them.
pub const REGISTRY: &[Entry] = &[
    entry::<crate::quantize::Quantize>(),
    entry::<crate::factorize::Factorize>(),
    entry::<crate::prune::Prune>(),
    entry::<crate::prune::drop::Drop>(),
    entry::<crate::tie::Tie>(),
    entry::<crate::cleanup::LastPosition>(),
    entry::<crate::cleanup::DeadCode>(),
];

/// The registry entry named by `call`; an unknown name is an error listing the known ones.
pub fn lookup(name: &str) -> Result<&'static Entry, PassError> {
    REGISTRY.iter().find(|p| p.name == name).ok_or_else(|| {
        let known: Vec<&str> = REGISTRY.iter().map(|p| p.name).collect();
        PassError::not_applicable("pipeline", format!("unknown pass `{name}` (known: {})", known.join(", ")))
    })
}

/// Checks every call's name and options (values included) and every override's value
/// without running anything, so that a pipeline with a typo fails before calibration
/// starts. Overrides need a pass that takes them: none is ever skipped silently.
pub fn check(calls: &[PassCall], calibrated: bool, overrides: &[(String, String)]) -> Result<(), PassError> {
    let mut takers = Vec::new();
    for call in calls {
        let entry = lookup(&call.name)?;
        (entry.check)(call, calibrated)?;
        if let Some(check) = entry.overrides {
            takers.push((entry.name, check));
        }
    }
    if !overrides.is_empty() && takers.is_empty() {
        let known: Vec<&str> = REGISTRY.iter().filter(|e| e.overrides.is_some()).map(|e| e.name).collect();
        return Err(PassError::not_applicable(
            "pipeline",
            format!("no pass in the pipeline takes --override (passes that do: {})", known.join(", ")),
        ));
    }
    for (pattern, value) in overrides {
        for (name, check) in &takers {
            check(value).map_err(|e| PassError::options(name, format!("--override `{pattern}={value}`: {e}")))?;
        }
    }
    Ok(())
}

/// Runs `calls` in order on `graph`, verifying the graph after each, and calls
/// `after(call, graph)` when each has run.
pub fn run(
    graph: &mut Graph,
    calls: &[PassCall],
    ctx: &Context,
    after: &mut dyn FnMut(&PassCall, &Graph),
) -> Result<Vec<PassReport>, PassError> {
    check(calls, ctx.calibrated(), &ctx.overrides)?;
    let mut reports = Vec::with_capacity(calls.len());
    for call in calls {
        let entry = lookup(&call.name)?;
        reports.push((entry.run)(graph, call, ctx)?);
        kiln_ir::verify(graph).map_err(|e| PassError::Invalid { pass: entry.name, message: e.to_string() })?;
        after(call, graph);
    }
    Ok(reports)
}

/// Whether any of `calls` probes (see [`Pass::probes`]); unknown passes do not (running
/// them fails).
pub fn probes_any(calls: &[PassCall]) -> bool {
    calls.iter().any(|call| lookup(&call.name).is_ok_and(|p| (p.probes)(call)))
}

/// Every pass with its summary and options table, as `kiln passes` prints it.
pub fn help() -> String {
    let mut out = String::new();
    for entry in REGISTRY {
        let summary = crate::options::wrap(&format!("{}: {}", entry.name, entry.summary), "", crate::options::WIDTH);
        out.push_str(&summary.replacen('\n', "\n  ", summary.matches('\n').count().saturating_sub(1)));
        out.push_str(&crate::options::render(entry.options));
        out.push('\n');
    }
    out
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
        let probes = |text: &str| probes_any(&parse(text).unwrap());
        assert!(probes("quantize(bits=4.5)"));
        assert!(probes("quantize(format=int8, activations=int8)"));
        assert!(probes("quantize(format=int4g64a); quantize(bits=8.5, method=rtn)"));
        assert!(!probes("quantize(format=int4g64a)"));
        assert!(!probes("quantize(format=int8, activations=int8-row)"));
        assert!(!probes("quantize(format=int8, activations=int8-block)"));
        assert!(!probes("prune(sparsity=0.5)"));
        assert!(probes("prune(heads=0.25)"), "a structured prune heals with calibration");
        assert!(!probes("prune(channels=0.25, refit=none)"));
        assert!(probes("drop(blocks=2)"));
        assert!(!probes("drop(blocks=[2])"));
        assert!(probes("drop(blocks=[2], refit=true)"), "the refit after the gap probes");
    }

    /// Names and options are checked against the registry's tables before anything runs,
    /// and the errors name what is known.
    #[test]
    fn unknown_passes_and_options_are_errors_that_list_the_known_ones() {
        let check = |text: &str| check(&parse(text).unwrap(), true, &[]).map_err(|e| e.to_string());
        assert!(check("quantize(bits=4.5); last_position(output=logits, axis=1); dead_code").is_ok());
        let err = check("merge(keep=0.9)").unwrap_err();
        assert!(
            err.contains("unknown pass `merge`")
                && err.contains("quantize, factorize, prune, drop, tie, last_position, dead_code"),
            "{err}"
        );
        let err = check("quantize(bits=4.5, bitz=3)").unwrap_err();
        assert!(err.contains("unknown option `bitz`"), "{err}");
        assert!(err.contains("bits, format, method, act_order, damp, clip, activations, lorc_rank"), "{err}");
        let err = check("quantize(bits=4.5, bits=3)").unwrap_err();
        assert!(err.contains("`bits` is given twice"), "{err}");
        let err = check("dead_code(x=1)").unwrap_err();
        assert!(err.contains("options of dead_code: none"), "{err}");
    }

    /// Values are checked when a call is parsed, with the table's words.
    #[test]
    fn bad_values_quote_the_options_table() {
        let parse_quantize = |text: &str, calibrated: bool| {
            let call = &parse(text).unwrap()[0];
            parse_options::<crate::quantize::Quantize>(call, calibrated).map_err(|e| e.to_string())
        };
        let err = parse_quantize("quantize(format=int8, method=awq)", true).unwrap_err();
        assert!(err.contains("method=awq: expected rtn|gptq"), "{err}");
        let err = parse_quantize("quantize(bits=40)", true).unwrap_err();
        assert!(err.contains("bits=40: expected between 1 and 32"), "{err}");
        let err = parse_quantize("quantize(bits=4, format=int8)", true).unwrap_err();
        assert!(err.contains("not both"), "{err}");
        let err = parse_quantize("quantize(format=int8, method=gptq)", false).unwrap_err();
        assert!(err.contains("needs calibration data"), "{err}");
        let o = parse_quantize("quantize(format=int8)", true).unwrap();
        assert_eq!(o.method, crate::quantize::Method::Gptq, "GPTQ is the default with calibration");
        let o = parse_quantize("quantize(format=int8)", false).unwrap();
        assert_eq!(o.method, crate::quantize::Method::Rtn, "RTN without");
        assert!(o.gptq.act_order && o.gptq.clip, "act-order and searched scales by default");
    }

    /// `factorize(method=tt)`'s options: its targets, its defaults with and without
    /// calibration, and the options of other methods refused rather than ignored.
    #[test]
    fn tensor_train_options_parse_or_say_why_not() {
        use crate::factorize::{Allocation, Factorize, Method, Target};
        let parse_tt = |text: &str, calibrated: bool| {
            let call = &parse(text).unwrap()[0];
            parse_options::<Factorize>(call, calibrated).map_err(|e| e.to_string())
        };
        let o = parse_tt("factorize(method=tt)", true).unwrap();
        assert_eq!(
            (o.method, o.target, o.allocation, o.heal, o.cores),
            (Method::Tt, Target::Keep(0.9), Allocation::Errors, None, 3)
        );
        let o = parse_tt("factorize(method=tt, bond=16, cores=4)", false).unwrap();
        assert_eq!((o.target, o.allocation, o.cores), (Target::Bond(16), Allocation::Uniform, 4));
        for (text, says) in [
            ("factorize(method=tt, bond=8, keep=0.5)", "one of bond and keep"),
            ("factorize(method=tt, rank=8)", "bond=B or keep=F"),
            ("factorize(method=tt, energy=0.9)", "bond=B or keep=F"),
            ("factorize(method=tt, cores=5)", "cores=5: expected 2, 3 or 4"),
            ("factorize(method=tt, bond=0)", "expected a positive bond"),
            ("factorize(method=tt, heal=true)", "method=tt's cores are not refitted"),
            ("factorize(method=tt, refit=left)", "method=tt does not heal"),
            ("factorize(method=whitened, bond=8)", "options of method=tt"),
            ("factorize(cores=2)", "options of method=tt"),
        ] {
            let err = parse_tt(text, true).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    /// A list value in brackets is one value, spaces and commas included; `drop` takes
    /// a count or a list, and a list or count it cannot use is refused.
    #[test]
    fn lists_parse_as_one_value() {
        use crate::prune::drop::{Blocks, Drop};
        let calls = parse("drop(blocks=[3, 7]), quantize(bits=4)").unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].args, [("blocks".to_string(), "[3, 7]".to_string())]);
        assert_eq!(parse(&calls[0].to_string()).unwrap()[0].args, calls[0].args, "it prints as it parses");
        assert_eq!(parse("tie(groups=[[1,2],[3,4]])").unwrap()[0].args[0].1, "[[1,2],[3,4]]");
        let err = parse("drop(blocks=[3, 7)").unwrap_err();
        assert!(err.message.contains("without its `]`"), "{}", err.message);
        let drop = |text: &str, calibrated: bool| {
            parse_options::<Drop>(&parse(text).unwrap()[0], calibrated).map(|o| o.blocks).map_err(|e| e.to_string())
        };
        assert_eq!(drop("drop(blocks=[7,3])", false), Ok(Blocks::Forced(vec![3, 7])));
        assert_eq!(drop("drop(blocks=3)", true), Ok(Blocks::Count(3)));
        for (text, calibrated, says) in [
            ("drop(blocks=3)", false, "pass --calib"),
            ("drop(blocks=0)", true, "K >= 1"),
            ("drop(blocks=[3,3])", true, "listed twice"),
            ("drop(blocks=[a])", true, "`a` is not a block index"),
            ("drop", true, "give blocks="),
        ] {
            let err = drop(text, calibrated).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    /// `prune`'s options: `N:M` patterns parse in a pipeline, the method's default follows
    /// `--calib`, and wanda or sparsegpt without it, both targets at once, or a bad pattern are refused.
    #[test]
    fn prune_options_parse_or_say_why_not() {
        use crate::prune::{Method, Prune, Target};
        let parse_prune = |text: &str, calibrated: bool| {
            let call = &parse(text).unwrap()[0];
            parse_options::<Prune>(call, calibrated).map_err(|e| e.to_string())
        };
        let o = parse_prune("prune(pattern=2:4)", true).unwrap();
        assert_eq!((o.method, o.target), (Method::SparseGpt, Target::Pattern(2, 4)));
        let o = parse_prune("prune(method=wanda)", true).unwrap();
        assert_eq!((o.method, o.target), (Method::Wanda, Target::Sparsity(0.5)));
        assert_eq!(parse_prune("prune", true).unwrap().damp, crate::prune::DAMP);
        assert_eq!(parse_prune("prune(damp=0.01)", true).unwrap().damp, 0.01);
        for (text, says) in [("prune(damp=0.01, method=wanda)", "method=wanda has none"), ("prune(damp=-1)", ">= 0")] {
            let err = parse_prune(text, true).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
        let o = parse_prune("prune", false).unwrap();
        assert_eq!((o.method, o.target), (Method::Magnitude, Target::Sparsity(0.5)));
        let o = parse_prune("prune(sparsity=0.7, method=magnitude)", true).unwrap();
        assert_eq!((o.method, o.target), (Method::Magnitude, Target::Sparsity(0.7)));
        for (text, says) in [
            ("prune(method=wanda)", "pass --calib"),
            ("prune(sparsity=0.5, pattern=2:4)", "not both"),
            ("prune(pattern=4:4)", "1 <= N < M"),
            ("prune(pattern=24)", "expected N:M"),
            ("prune(sparsity=1)", "fraction in (0, 1)"),
            ("prune(method=sparsegpt)", "pass --calib"),
            ("prune(method=obs)", "expected sparsegpt|wanda|magnitude"),
        ] {
            let err = parse_prune(text, false).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
        let o = |p: &str, v: &str| vec![(p.to_string(), v.to_string())];
        assert!(check(&parse("prune(sparsity=0.5)").unwrap(), false, &o("blk.*", "0.3")).is_ok());
        let err = check(&parse("prune(sparsity=0.5)").unwrap(), false, &o("blk.*", "rank:3")).unwrap_err();
        assert!(err.to_string().contains("is not a sparsity"), "{err}");
    }

    /// `kiln passes` shows every pass and every option of each, with its default.
    #[test]
    fn help_lists_every_pass_and_option() {
        let help = help();
        for entry in REGISTRY {
            let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(flat.contains(&format!("{}: {}", entry.name, entry.summary)), "{}", entry.name);
            for o in entry.options {
                assert!(help.contains(&format!("{}={}", o.name, o.values)), "{}.{}", entry.name, o.name);
                assert!(help.contains(&format!("(default: {})", o.default)), "{}.{}", entry.name, o.name);
                assert!(flat.contains(o.help), "{}.{}", entry.name, o.name);
            }
        }
    }

    /// Values are checked up front too, and overrides need a pass that takes them.
    #[test]
    fn values_and_overrides_are_checked_before_anything_runs() {
        let o = |p: &str, v: &str| vec![(p.to_string(), v.to_string())];
        let check = |text: &str, overrides: &[(String, String)]| {
            check(&parse(text).unwrap(), true, overrides).map_err(|e| e.to_string())
        };
        let err = check("quantize(format=int8, method=awq)", &[]).unwrap_err();
        assert!(err.contains("method=awq"), "{err}");
        assert!(check("quantize(format=int8)", &o("blk.0.*", "f16")).is_ok());
        let err = check("quantize(format=int8)", &o("blk.0.*", "int5g32")).unwrap_err();
        assert!(err.contains("--override `blk.0.*=int5g32`"), "{err}");
        let err = check("dead_code", &o("blk.0.*", "int8")).unwrap_err();
        assert!(err.contains("no pass in the pipeline takes --override") && err.contains("quantize"), "{err}");
    }
}
