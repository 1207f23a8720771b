//! Per-thread voluntary context switches (the thread hand-offs a workload costs), for the
//! profiling examples.

/// Each thread's name and voluntary context switches so far (Linux's /proc).
pub(crate) fn per_thread_switches() -> Vec<(String, i64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let n = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse()
                .ok()?;
            Some((
                format!("{} ({})", name.trim(), t.file_name().to_string_lossy()),
                n,
            ))
        })
        .collect()
}

/// What each thread of `after` slept since `before` (both from [`per_thread_switches`]),
/// divided by `per` (round trips, writes): one line each, to print.
pub(crate) fn switches_since(before: &[(String, i64)], per: f64, unit: &str) -> Vec<String> {
    per_thread_switches()
        .into_iter()
        .map(|(name, n)| {
            let b = before
                .iter()
                .find(|(m, _)| *m == name)
                .map_or(0, |(_, b)| *b);
            #[allow(clippy::cast_precision_loss)] // Counts far below 2^52.
            let v = (n - b) as f64 / per;
            format!("  {name}: {v:.2} per {unit}")
        })
        .collect()
}
