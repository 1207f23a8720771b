//! Progress of the bench's steps on stderr, through `indicatif`.
//!
//! One bar (bytes or operations) or spinner per step while stderr is a terminal. When it is not
//! (a pipe, a file, CI), `ProgressDrawTarget::stderr()` is hidden and nothing at all is written:
//! no `\r`, no escape codes in logs (`tests/cli.rs` `bench_stderr_is_quiet_without_a_terminal`).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What a step counts.
#[derive(Debug, Clone, Copy)]
pub(super) enum Unit {
    /// Bytes written, of this many.
    Bytes(u64),
    /// Operations (round trips, connections), of this many.
    Ops(u64),
}

/// The numbered steps of one run: `[3/12] one-way: tcp loopback`.
#[derive(Debug)]
pub(super) struct Steps {
    total: usize,
    done: usize,
}

impl Steps {
    pub(super) fn new(total: usize) -> Steps {
        Steps { total, done: 0 }
    }

    /// Start the next step; it ends (and its line is cleared) when the returned [`Step`] drops.
    pub(super) fn start(&mut self, what: &str, unit: Unit) -> Step {
        self.done += 1;
        let (len, template) = match unit {
            Unit::Bytes(n) => (
                n,
                "{prefix} {spinner} {msg} [{bar:24}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
            ),
            Unit::Ops(n) => (n, "{prefix} {spinner} {msg} [{bar:24}] {pos}/{len}"),
        };
        let target = ProgressDrawTarget::stderr();
        if target.is_hidden() {
            return Step(ProgressBar::hidden());
        }
        // Styled while hidden, so the first frame drawn is already the whole line.
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("[{}/{}]", self.done, self.total));
        bar.set_message(what.to_string());
        bar.set_draw_target(target);
        bar.enable_steady_tick(Duration::from_millis(100));
        Step(bar)
    }
}

/// One running step (threads of one step share it by reference: the bar is `Sync`).
#[derive(Debug)]
pub(super) struct Step(ProgressBar);

impl Step {
    /// `n` more bytes or operations done.
    pub(super) fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    /// Count from zero again, to `len`, under a new message (a step with phases: open, measure).
    pub(super) fn phase(&self, what: String, len: u64) {
        self.0.set_message(what);
        self.0.set_length(len);
        self.0.set_position(0);
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
