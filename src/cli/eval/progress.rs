//! `kvc eval`'s progress display: one bar per run on a terminal, else a line per run; warnings
//! are printed and kept for the JSON summary.
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::eval::record::PredRecord;
use crate::eval::run::{Observer, RunOutcome};

/// Progress display: one bar per run on a terminal, else a line per run.
pub struct Progress {
    show_bars: bool,
    quiet: bool,
    bar: Option<ProgressBar>,
    t0: Instant,
    tokens: usize,
    /// Every warning shown, for the JSON summary.
    pub warnings: Vec<String>,
}

impl Progress {
    /// Bars when stderr is a terminal and neither `no_progress` nor `quiet` is set.
    pub fn new(no_progress: bool, quiet: bool) -> Self {
        use std::io::IsTerminal;
        Progress {
            show_bars: !no_progress && !quiet && std::io::stderr().is_terminal(),
            quiet,
            bar: None,
            t0: Instant::now(),
            tokens: 0,
            warnings: Vec::new(),
        }
    }
}

impl Observer for Progress {
    fn run_start(&mut self, label: &str, total: usize, done: usize) {
        self.t0 = Instant::now();
        self.tokens = 0;
        if self.show_bars {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar.set_position(done as u64);
            bar.reset_eta();
            self.bar = Some(bar);
        } else if !self.quiet {
            eprintln!("run {label}: {total} samples ({done} already done)");
        }
    }

    fn sample(&mut self, rec: &PredRecord, tokens: usize) {
        self.tokens += tokens;
        if let Some(b) = &self.bar {
            let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
            b.set_message(format!("{:.0} tok/s", self.tokens as f64 / secs));
            b.inc(1);
            if let Some(e) = &rec.error {
                b.println(format!(
                    "warning: {} {}: {e}",
                    rec.task.as_deref().unwrap_or(""),
                    rec.id.as_deref().unwrap_or("")
                ));
            }
        } else if let Some(e) = &rec.error {
            eprintln!(
                "warning: {} {} failed: {e}",
                rec.task.as_deref().unwrap_or(""),
                rec.id.as_deref().unwrap_or("")
            );
        }
    }

    fn run_end(&mut self, o: &RunOutcome) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if !self.quiet {
            eprintln!(
                "run {}: {} new, {} resumed, {} failed{} -> {}",
                o.run,
                o.n_new,
                o.n_resumed,
                o.n_failed,
                if o.interrupted { ", interrupted" } else { "" },
                o.dir.display()
            );
        }
    }

    fn warn(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(format!("warning: {msg}")),
            None => eprintln!("warning: {msg}"),
        }
        self.warnings.push(msg.to_string());
    }
}
