//! Parsing and printing of sizes and times for people, and plain-text tables.

/// Parses a byte size: a number with an optional binary unit (`K`, `M`, `G`, `T`,
/// optionally followed by `i`/`iB`/`B`), e.g. `4096`, `512M`, `10GiB`, `1T`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 512M, 10G)"))?;
    let shift = match unit
        .trim()
        .trim_end_matches('B')
        .trim_end_matches('i')
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?} has an unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Prints a byte count with a binary unit, e.g. `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Prints seconds since the Unix epoch as an RFC 3339 UTC time.
pub fn utc_time(secs: u64) -> String {
    civil(secs, "-", ":")
}

/// [`utc_time`] without separators, `20261205T100211Z`: for names (of snapshots,
/// backups), which take no `:`.
pub fn utc_stamp(secs: u64) -> String {
    civil(secs, "", "")
}

fn civil(secs: u64, date_sep: &str, time_sep: &str) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{date_sep}{month:02}{date_sep}{day:02}T{:02}{time_sep}{:02}{time_sep}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How a snapshot stands, in one word: deleted (waiting for a purge), active (on the
/// chain reads go through), or branch (kept after a revert).
pub fn layer_state(removed: bool, in_chain: bool) -> &'static str {
    match (removed, in_chain) {
        (true, _) => "deleted",
        (false, true) => "active",
        (false, false) => "branch",
    }
}

/// Labels as `k=v,k2=v2`, in the map's order.
pub fn labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    labels
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders rows as left-aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Prints an engine's snapshot list: a table, or JSON.
pub fn print_snapshots(list: &horn_proto::engine_control::SnapshotList, json: bool) -> anyhow::Result<()> {
    if json {
        let rows: Vec<serde_json::Value> = list
            .snapshots
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name, "parent": s.parent, "created": s.created,
                    "labels": s.labels, "removed": s.removed, "in_chain": s.in_chain,
                })
            })
            .collect();
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .snapshots
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                if s.parent.is_empty() {
                    "-".into()
                } else {
                    s.parent.clone()
                },
                utc_time(s.created),
                layer_state(s.removed, s.in_chain).into(),
                labels(&s.labels),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["NAME", "PARENT", "CREATED", "STATE", "LABELS"], &rows)
    );
    Ok(())
}

/// Prints what `Verify` found (a table of differences, or JSON) and fails if the
/// replicas differ, saying how much.
pub fn print_verify(r: &horn_proto::engine_control::VerifyReply, json: bool) -> anyhow::Result<()> {
    if json {
        let diffs: Vec<serde_json::Value> = r
            .differences
            .iter()
            .map(|d| serde_json::json!({"offset": d.offset, "length": d.length, "replicas": d.replicas}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "bytes_compared": r.bytes_compared, "replicas": r.replicas,
                "differing_bytes": r.differing_bytes, "differences": diffs,
            })
        );
    } else if !r.differences.is_empty() {
        let rows: Vec<Vec<String>> = r
            .differences
            .iter()
            .map(|d| vec![d.offset.to_string(), d.length.to_string(), d.replicas.join(" ")])
            .collect();
        print!("{}", table(&["OFFSET", "LENGTH", "DIFFERS ON"], &rows));
    }
    if r.differing_bytes > 0 {
        anyhow::bail!(
            "the replicas differ in {} bytes of {} compared (against {})",
            r.differing_bytes,
            r.bytes_compared,
            r.replicas.first().map_or("-", |s| s.as_str())
        );
    }
    if !json {
        println!(
            "verified {} on {} replicas: identical ({})",
            human_bytes(r.bytes_compared),
            r.replicas.len(),
            r.replicas.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("ten").unwrap_err().contains("not a size"));
        assert!(parse_size("5X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999T").unwrap_err().contains("too large"));
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(1_795_219_200), "2026-11-21T00:00:00Z");
        assert_eq!(utc_time(951_825_600), "2000-02-29T12:00:00Z");
    }

    #[test]
    fn bytes_print_with_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
