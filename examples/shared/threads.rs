//! Per-thread voluntary context switches (the thread hand-offs a workload costs) and CPU time,
//! for the profiling examples.

/// One thread's name (with its id), voluntary context switches and nanoseconds on a CPU so
/// far (Linux's /proc: `status` and `schedstat`).
pub(crate) type ThreadCount = (String, i64, u64);

/// Every thread of this process, counted now.
pub(crate) fn per_thread_switches() -> Vec<ThreadCount> {
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
            let cpu = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            Some((
                format!("{} ({})", name.trim(), t.file_name().to_string_lossy()),
                n,
                cpu,
            ))
        })
        .collect()
}

/// What each thread did since `before` (from [`per_thread_switches`]), divided by `per`
/// (round trips, writes): its sleeps and its CPU time, one line each, to print.
pub(crate) fn switches_since(before: &[ThreadCount], per: f64, unit: &str) -> Vec<String> {
    per_thread_switches()
        .into_iter()
        .map(|(name, n, cpu)| {
            let (b, b_cpu) = before
                .iter()
                .find(|(m, ..)| *m == name)
                .map_or((0, 0), |(_, b, c)| (*b, *c));
            #[allow(clippy::cast_precision_loss)] // Counts far below 2^52.
            let (sleeps, us) = (
                (n - b) as f64 / per,
                cpu.saturating_sub(b_cpu) as f64 / 1000.0 / per,
            );
            format!("  {name}: {sleeps:.2} sleeps, {us:.2} us on a CPU per {unit}")
        })
        .collect()
}
