//! Printing benchmark results: JSON lines for scripts, tables for people.

use horn_manager::format::{human_bytes, table};
use serde_json::Value;

/// Prints results as JSON lines or as a table at the end.
pub struct Report {
    /// One JSON object per line instead of tables.
    pub json: bool,
    /// Everything emitted so far.
    pub rows: Vec<Value>,
}

impl Report {
    /// Prints (with --json) and keeps one result.
    pub fn emit(&mut self, v: Value) {
        if self.json {
            println!("{v}");
        } else {
            eprintln!("  done: {}", v["workload"]);
        }
        self.rows.push(v);
    }

    /// Prints the tables (without --json).
    pub fn finish(&self) {
        if self.json {
            return;
        }
        let cell = |v: &Value, k: &str| match &v[k] {
            Value::Null => "-".to_string(),
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                if f.fract() == 0.0 {
                    format!("{f:.0}")
                } else {
                    format!("{f:.2}")
                }
            }
            other => other.to_string().trim_matches('"').to_string(),
        };
        let io: Vec<Vec<String>> = self
            .rows
            .iter()
            .filter(|v| v["part"] == "io")
            .map(|v| {
                [
                    "workload",
                    "replicas",
                    "iops",
                    "lat_us_mean",
                    "peer_iops",
                    "peer_lat_us_mean",
                    "ratio",
                    "cpu_us_per_io",
                    "peer_cpu_us_per_io",
                ]
                .iter()
                .map(|k| cell(v, k))
                .collect()
            })
            .collect();
        if !io.is_empty() {
            print!(
                "{}",
                table(
                    &[
                        "WORKLOAD",
                        "REPLICAS",
                        "IOPS",
                        "LAT_US",
                        "FIO_IOPS",
                        "FIO_LAT_US",
                        "RATIO",
                        "CPU_US/IO",
                        "FIO_CPU_US/IO"
                    ],
                    &io
                )
            );
        }
        let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        for v in self.rows.iter().filter(|v| v["part"] == "index") {
            println!(
                "{}: index {} per TiB ({:.2} bytes per 4 KiB block) over {} layers; Longhorn v1: {} per TiB",
                cell(v, "workload"),
                human_bytes(num(v, "bytes_per_tib") as u64),
                num(v, "bytes_per_4k_block"),
                cell(v, "layers"),
                human_bytes(num(v, "peer_bytes_per_tib") as u64),
            );
        }
        for v in self.rows.iter().filter(|v| v["part"] == "chain") {
            println!(
                "{}: {} layers on a {} volume built in {} s, opened in {} ms, index {}, {} blocks verified",
                cell(v, "workload"),
                cell(v, "layers"),
                human_bytes(num(v, "volume_bytes") as u64),
                cell(v, "build_s"),
                cell(v, "open_ms"),
                human_bytes(num(v, "index_bytes") as u64),
                cell(v, "blocks_verified"),
            );
        }
    }
}
