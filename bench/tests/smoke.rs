//! The benchmark harness runs end to end and prints what docs/benchmarks.md quotes.
//! It asserts the shape of the output and that the figures are positive, never their
//! size: speed is judged by reading the figures, not by a timed test.

use std::process::Command;

fn bench(args: &[&str]) -> Vec<serde_json::Value> {
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_horn-bench"))
        .args(["store", "--json", "--dir"])
        .arg(scratch.path())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "horn-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn store_io_part_prints_ratios_against_fio() {
    if Command::new("fio").arg("--version").output().is_err() {
        skip(
            "store_io_part_prints_ratios_against_fio",
            "fio is not installed (scripts/install-deps)",
        );
        return;
    }
    let rows = bench(&["--parts", "io", "--size", "64M", "--runtime", "1"]);
    let names: Vec<&str> = rows.iter().map(|r| r["workload"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "randread-4k-qd32",
            "randwrite-4k-qd32",
            "randread-4k-qd1",
            "randwrite-4k-qd1",
            "read-1m-qd8",
            "write-1m-qd8"
        ]
    );
    for r in &rows {
        for k in ["iops", "lat_us_mean", "peer_iops", "peer_lat_us_mean", "ratio"] {
            assert!(
                r[k].as_f64().is_some_and(|v| v > 0.0),
                "{k} missing or zero in {r}"
            );
        }
    }
}

#[test]
fn store_index_and_chain_parts_report_memory_and_open_time() {
    let rows = bench(&[
        "--parts",
        "index,chain",
        "--index-volume",
        "4G",
        "--chain-layers",
        "30",
    ]);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0]["workload"], "index-1mib-extents");
    assert_eq!(rows[1]["workload"], "index-random-4k-every-block");
    for r in &rows[..2] {
        assert!(r["bytes_per_tib"].as_f64().unwrap() > 0.0);
        assert!(r["bytes_per_4k_block"].as_f64().is_some());
    }
    assert_eq!(rows[2]["workload"], "chain-30-layers");
    assert_eq!(rows[2]["layers"], 31);
    assert_eq!(rows[2]["verified"], true);
}

#[test]
fn volume_benchmark_runs_the_engine_on_replica_processes_against_fio() {
    if Command::new("fio").arg("--version").output().is_err() {
        skip(
            "volume_benchmark_runs_the_engine_on_replica_processes_against_fio",
            "fio is not installed",
        );
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_horn-bench"))
        .args([
            "volume",
            "--json",
            "--replicas",
            "2",
            "--size",
            "32M",
            "--runtime",
            "1",
            "--queues",
            "2",
            "--dir",
        ])
        .arg(scratch.path())
        .args(["--workloads", "randwrite-4k-qd32,randread-4k-qd1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "horn-bench volume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r["replicas"], 2);
        assert_eq!(r["queues"], 2);
        for k in [
            "iops",
            "lat_us_mean",
            "peer_iops",
            "ratio",
            "cpu_us_per_io",
            "peer_cpu_us_per_io",
        ] {
            assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k} in {r}");
        }
    }
}

/// Skips the calling test, saying why: printed, and counted as skipped (not passed) by
/// `scripts/test` through the file named in `HORN_SKIP_LOG`.
fn skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    if let Ok(path) = std::env::var("HORN_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}
