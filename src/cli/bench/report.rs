//! The bench's rows, as a table or as JSON.

use anyhow::Result;
use serde_json::{json, Map, Value};

/// One measured line.
#[derive(Debug)]
pub(super) struct Row {
    pub(super) workload: String,
    pub(super) transport: String,
    pub(super) value: f64,
    pub(super) unit: &'static str,
    /// Parameters of this row beyond the run's (JSON only; the table says them in `workload`):
    /// `connections` of the parallel row, `open_streams` and `ops` of the scale rows.
    pub(super) params: Vec<(&'static str, u64)>,
}

impl Row {
    pub(super) fn new(
        workload: impl Into<String>,
        transport: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            workload: workload.into(),
            transport: transport.into(),
            value,
            unit,
            params: Vec::new(),
        }
    }

    pub(super) fn with(mut self, key: &'static str, value: u64) -> Row {
        self.params.push((key, value));
        self
    }
}

/// The socketpair row of the same workload: the yardstick of the `x socketpair` column.
fn baseline(rows: &[Row], workload: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.workload == workload && r.transport == "unix socketpair")
        .map(|r| r.value)
}

/// Rounded as the table shows it, so JSON consumers see stable numbers.
fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

/// A JSON array with one object per row: `workload`, `transport`, `value`, `unit`,
/// `vs_socketpair` (0 when the workload has no socketpair row), `device`, and the row's params.
pub(super) fn json(rows: &[Row], device: &str) -> Result<()> {
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            let ratio = baseline(rows, &r.workload).map_or(0.0, |b| r.value / b);
            let mut o = Map::new();
            o.insert("workload".into(), json!(r.workload));
            o.insert("transport".into(), json!(r.transport));
            o.insert("value".into(), json!(round(r.value, 4)));
            o.insert("unit".into(), json!(r.unit));
            o.insert("vs_socketpair".into(), json!(round(ratio, 3)));
            o.insert("device".into(), json!(device));
            for &(k, v) in &r.params {
                o.insert(k.into(), json!(v));
            }
            Value::Object(o)
        })
        .collect();
    outln!("{}", Value::Array(items))
}

/// The table, under a line with the run's parameters (`header`) and over the notes.
pub(super) fn table(rows: &[Row], header: &str, notes: &[String]) -> Result<()> {
    outln!("{header}")?;
    outln!(
        "{:<30} {:<34} {:>12} {:<14} {:>12}",
        "workload",
        "transport",
        "value",
        "unit",
        "x socketpair"
    )?;
    for r in rows {
        let ratio = baseline(rows, &r.workload)
            .map_or(String::from("-"), |b| format!("{:.2}x", r.value / b));
        outln!(
            "{:<30} {:<34} {:>12.2} {:<14} {:>12}",
            r.workload,
            r.transport,
            r.value,
            r.unit,
            ratio
        )?;
    }
    for n in notes {
        outln!("{n}")?;
    }
    Ok(())
}
