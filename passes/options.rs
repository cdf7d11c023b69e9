//! Typed pass options. Each pass's options type has one table of [`OptionHelp`] rows (name,
//! values, default, meaning): the parser checks every `key=value` of a call against it, its
//! errors quote it, and `kiln passes` prints it. Help lives there and nowhere else.

use crate::PassError;
use crate::manager::PassCall;
use std::str::FromStr;

/// One option of a pass, as `kiln passes` prints it.
#[derive(Clone, Copy, Debug)]
pub struct OptionHelp {
    pub name: &'static str,
    /// The values it takes, as a user writes them (`rtn|gptq`, `a number of bits`).
    pub values: &'static str,
    /// Its default, in words when it depends on something (`gptq with --calib, else rtn`).
    pub default: &'static str,
    pub help: &'static str,
}

/// The options type of a pass: its table, and how a call's arguments become a value.
pub trait Options: Sized {
    /// Every option the pass takes, in the order `kiln passes` prints them.
    const HELP: &'static [OptionHelp];
    fn parse(args: &mut Args) -> Result<Self, PassError>;
}

/// A pass without options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoOptions;

impl Options for NoOptions {
    const HELP: &'static [OptionHelp] = &[];
    fn parse(_: &mut Args) -> Result<NoOptions, PassError> {
        Ok(NoOptions)
    }
}

/// A call's arguments while its options type reads them: each is checked against the
/// table when the `Args` is made (unknown and repeated names are errors that list the
/// known ones), then taken by name and parsed.
pub struct Args<'a> {
    pass: &'static str,
    table: &'static [OptionHelp],
    args: Vec<(&'a str, &'a str)>,
    calibrated: bool,
}

impl<'a> Args<'a> {
    /// The arguments of `call` for a pass named `pass` with options `table`; `calibrated`
    /// says whether calibration inputs were given (some defaults depend on it).
    pub fn new(
        pass: &'static str,
        table: &'static [OptionHelp],
        call: &'a PassCall,
        calibrated: bool,
    ) -> Result<Args<'a>, PassError> {
        let mut args: Vec<(&str, &str)> = Vec::new();
        for (key, value) in &call.args {
            if !table.iter().any(|o| o.name == key) {
                let known: Vec<&str> = table.iter().map(|o| o.name).collect();
                let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                return Err(PassError::options(pass, format!("unknown option `{key}` (options of {pass}: {known})")));
            }
            if args.iter().any(|(k, _)| k == key) {
                return Err(PassError::options(pass, format!("`{key}` is given twice")));
            }
            args.push((key, value));
        }
        Ok(Args { pass, table, args, calibrated })
    }

    /// Whether calibration inputs were given.
    pub fn calibrated(&self) -> bool {
        self.calibrated
    }

    /// The text of option `name`, if the call gives it.
    pub fn text(&self, name: &str) -> Option<&'a str> {
        debug_assert!(self.table.iter().any(|o| o.name == name), "{name} is not in {}'s table", self.pass);
        self.args.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }

    /// Option `name` parsed as a `T`, if given; a value that does not parse is an error
    /// that quotes the table's values.
    pub fn get<T: FromStr>(&self, name: &str) -> Result<Option<T>, PassError> {
        self.text(name).map(|v| v.parse().map_err(|_| self.invalid(name, v))).transpose()
    }

    /// Option `name` checked by `accept`, which says what is wrong with a value it refuses.
    pub fn get_with<T>(&self, name: &str, accept: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>, PassError> {
        self.text(name)
            .map(|v| accept(v).map_err(|why| PassError::options(self.pass, format!("{name}={v}: {why}"))))
            .transpose()
    }

    /// The error for a value of `name` that is not one of its values.
    pub fn invalid(&self, name: &str, value: &str) -> PassError {
        let values = self.table.iter().find(|o| o.name == name).map_or("?", |o| o.values);
        PassError::options(self.pass, format!("{name}={value}: expected {values}"))
    }

    /// An error about the options as a whole.
    pub fn error(&self, message: impl Into<String>) -> PassError {
        PassError::options(self.pass, message.into())
    }
}

/// The table as `kiln passes` prints it: each option with its values and default, then
/// its meaning, wrapped.
pub fn render(table: &[OptionHelp]) -> String {
    let mut out = String::new();
    for o in table {
        out.push_str(&format!("  {}={}  (default: {})\n", o.name, o.values, o.default));
        out.push_str(&wrap(o.help, "      ", WIDTH));
    }
    out
}

/// The width `kiln passes` wraps at.
pub const WIDTH: usize = 92;

/// `text` wrapped at `width` columns, every line starting with `indent`.
pub fn wrap(text: &str, indent: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::from(indent);
    for word in text.split_whitespace() {
        if line.len() > indent.len() && line.len() + 1 + word.len() > width {
            out.push_str(line.trim_end());
            out.push('\n');
            line = String::from(indent);
        }
        if line.len() > indent.len() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if line.len() > indent.len() {
        out.push_str(&line);
        out.push('\n');
    }
    out
}
