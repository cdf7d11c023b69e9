//! The one progress-bar style of the CLI (work that takes seconds shows a bar on stderr).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` units named `unit` ("rows", "layers"), with elapsed time and an ETA.
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let template = format!("{{msg:32}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{elapsed}} (eta {{eta}})");
    ProgressBar::new(len)
        .with_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "))
}

/// `progress(done, total, what)` as the passes and analyses report it, shown on `bar`.
pub fn steps(bar: &ProgressBar) -> impl Fn(usize, usize, &str) + Sync + '_ {
    move |done, total, what| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_string());
    }
}
