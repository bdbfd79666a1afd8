//! A progress bar with rows/s and ETA on a terminal; nothing otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use nightshift_proto::wire::JobView;

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar when stderr is a terminal and `enabled`.
    pub fn new(enabled: bool, total: u64, name: &str) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:32}] {human_pos}/{human_len} rows  {per_sec}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(name.to_string());
        Self { bar: Some(bar) }
    }

    pub fn update(&self, view: &JobView) {
        if let Some(bar) = &self.bar {
            bar.set_length(view.rows_total);
            bar.set_position(view.rows_done);
            bar.set_message(format!(
                "{} shards {}/{} done{}",
                view.state,
                view.shards.done,
                view.shards.total(),
                if view.error_rows > 0 {
                    format!(", {} poison rows", view.error_rows)
                } else {
                    String::new()
                }
            ));
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
