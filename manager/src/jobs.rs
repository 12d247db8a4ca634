//! Recurring jobs' rules, without I/O: when a cron schedule fires next, and which of a
//! job's snapshots or backups its retain count lets go.
//!
//! A schedule is standard five-field cron, in UTC: minute (0-59), hour (0-23), day of
//! month (1-31), month (1-12), day of week (0-7, 0 and 7 Sunday). A field is `*`, a
//! number, a range `a-b`, a list `a,b-c`, any of them stepped (`*/15`, `0-30/10`).
//! As in cron, when both day fields are restricted a day matches either. The
//! manager's job loop (`api/recurring.rs`) asks [`Schedule::next_after`] when each
//! job is due, and [`to_retire`] what to delete after it ran.

use std::collections::BTreeSet;

/// A parsed cron schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: BTreeSet<u32>,
    hours: BTreeSet<u32>,
    days: BTreeSet<u32>,
    months: BTreeSet<u32>,
    weekdays: BTreeSet<u32>,
    /// The day-of-month field was `*` (so only the weekday restricts days), and the
    /// other way round.
    any_day: bool,
    any_weekday: bool,
    text: String,
}

fn field(text: &str, name: &str, lo: u32, hi: u32) -> Result<(BTreeSet<u32>, bool), String> {
    let bad = |why: &str| format!("{name} field {text:?}: {why} ({name} runs {lo}-{hi})");
    let mut out = BTreeSet::new();
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| bad("a step is a number above 0"))?,
            ),
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let a: u32 = a.parse().map_err(|_| bad("not a number"))?;
            let b: u32 = b.parse().map_err(|_| bad("not a number"))?;
            (a, b)
        } else {
            let a: u32 = range.parse().map_err(|_| bad("not a number"))?;
            // `5/15`: from 5 to the end, every 15.
            (a, if step > 1 { hi } else { a })
        };
        if a < lo || b > hi || a > b {
            return Err(bad("out of range"));
        }
        out.extend((a..=b).step_by(step as usize));
    }
    Ok((out, text == "*"))
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Schedule, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [mi, h, d, mo, w] = parts[..] else {
            return Err(format!(
                "{text:?} is not a cron schedule: give five fields, minute hour day-of-month month day-of-week (\"0 */6 * * *\")"
            ));
        };
        let (minutes, _) = field(mi, "minute", 0, 59)?;
        let (hours, _) = field(h, "hour", 0, 23)?;
        let (days, any_day) = field(d, "day-of-month", 1, 31)?;
        let (months, _) = field(mo, "month", 1, 12)?;
        let (mut weekdays, any_weekday) = field(w, "day-of-week", 0, 7)?;
        if weekdays.remove(&7) {
            weekdays.insert(0);
        }
        Ok(Schedule {
            minutes,
            hours,
            days,
            months,
            weekdays,
            any_day,
            any_weekday,
            text: text.to_string(),
        })
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian): the tests' way to
/// name a time.
#[cfg(test)]
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Schedule {
    fn day_matches(&self, day: i64) -> bool {
        let (_, m, d) = civil_from_days(day);
        // 1970-01-01 was a Thursday (4).
        let w = (day + 4).rem_euclid(7) as u32;
        if !self.months.contains(&m) {
            return false;
        }
        let dom = self.days.contains(&d);
        let dow = self.weekdays.contains(&w);
        match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }

    /// The first minute strictly after `unix` (seconds) when the schedule fires, in
    /// Unix seconds; `None` if it never does within eight years (`0 0 31 2 *`).
    pub fn next_after(&self, unix: u64) -> Option<u64> {
        let start = unix / 60 + 1;
        let (first_day, first_minute) = ((start / 1440) as i64, (start % 1440) as u32);
        for day in first_day..first_day + 366 * 8 {
            if !self.day_matches(day) {
                continue;
            }
            let from = if day == first_day { first_minute } else { 0 };
            for &h in &self.hours {
                for &m in &self.minutes {
                    let minute = h * 60 + m;
                    if minute >= from {
                        return Some((day as u64 * 1440 + u64::from(minute)) * 60);
                    }
                }
            }
        }
        None
    }
}

/// What a job made, as its retention sees it: a name and when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    /// The snapshot's or backup's name.
    pub name: String,
    /// When it was made, Unix seconds.
    pub created_unix: u64,
}

/// Of the snapshots or backups a job made, those its `retain` count lets go: all but
/// the `retain` newest (by time, then name). `retain` 0 keeps everything (a job that
/// never deletes).
pub fn to_retire(made: &[Made], retain: usize) -> Vec<String> {
    if retain == 0 || made.len() <= retain {
        return Vec::new();
    }
    let mut sorted: Vec<&Made> = made.iter().collect();
    sorted.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
    sorted[..made.len() - retain]
        .iter()
        .map(|m| m.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, mo: u32, d: u32, h: u64, mi: u64) -> u64 {
        days_from_civil(y, mo, d) as u64 * 86_400 + h * 3600 + mi * 60
    }

    #[test]
    fn civil_dates_go_both_ways() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for day in [-1000, 0, 59, 60, 11_016, 20_000, 20_792] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn schedules_fire_when_cron_would() {
        let s = |t: &str| t.parse::<Schedule>().unwrap();
        let t0 = at(2026, 12, 5, 6, 27); // a Saturday
        assert_eq!(s("* * * * *").next_after(t0), Some(t0 + 60));
        assert_eq!(s("*/15 * * * *").next_after(t0), Some(at(2026, 12, 5, 6, 30)));
        assert_eq!(s("0 */6 * * *").next_after(t0), Some(at(2026, 12, 5, 12, 0)));
        assert_eq!(s("30 2 * * *").next_after(t0), Some(at(2026, 12, 6, 2, 30)));
        // Mondays at 01:00; Sunday as 0 and as 7.
        assert_eq!(s("0 1 * * 1").next_after(t0), Some(at(2026, 12, 7, 1, 0)));
        assert_eq!(s("0 1 * * 7").next_after(t0), Some(at(2026, 12, 6, 1, 0)));
        assert_eq!(s("0 1 * * 0").next_after(t0), Some(at(2026, 12, 6, 1, 0)));
        // Both day fields restricted: either matches (the 1st, or a Monday).
        assert_eq!(s("0 0 1 * 1").next_after(t0), Some(at(2026, 12, 7, 0, 0)));
        // Month and year ends; a leap day.
        assert_eq!(s("0 0 1 1 *").next_after(t0), Some(at(2027, 1, 1, 0, 0)));
        assert_eq!(s("0 0 29 2 *").next_after(t0), Some(at(2028, 2, 29, 0, 0)));
        // A date that never comes.
        assert_eq!(s("0 0 31 2 *").next_after(t0), None);
        // Strictly after: at a firing minute, the next one.
        let noon = at(2026, 12, 5, 12, 0);
        assert_eq!(s("0 12 * * *").next_after(noon), Some(at(2026, 12, 6, 12, 0)));
        assert_eq!(s("0 12 * * *").next_after(noon - 1), Some(noon));
        assert_eq!(s("5,10-12/2 * * * *").minutes, [5, 10, 12].into_iter().collect());
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        let e = |t: &str| t.parse::<Schedule>().unwrap_err();
        assert!(e("* * * *").contains("five fields"), "{}", e("* * * *"));
        assert!(e("60 * * * *").contains("minute field"), "{}", e("60 * * * *"));
        assert!(e("* 24 * * *").contains("hour field"));
        assert!(e("* * 0 * *").contains("day-of-month"));
        assert!(e("* * * 13 *").contains("month field"));
        assert!(e("* * * * 8").contains("day-of-week"));
        assert!(e("*/0 * * * *").contains("step"));
        assert!(e("5-1 * * * *").contains("out of range"));
        assert!(e("a * * * *").contains("not a number"));
    }

    #[test]
    fn retain_keeps_the_newest_and_retires_the_rest() {
        let made: Vec<Made> = (0..6)
            .map(|i| Made {
                name: format!("s{i}"),
                created_unix: 1000 + (i * 7 % 6),
            })
            .collect();
        // Times: s0 1000, s1 1001, s2 1002, s3 1003, s4 1004, s5 1005.
        assert_eq!(to_retire(&made, 3), ["s0", "s1", "s2"]);
        assert_eq!(to_retire(&made, 6), Vec::<String>::new());
        assert_eq!(to_retire(&made, 10), Vec::<String>::new());
        assert_eq!(to_retire(&made, 0), Vec::<String>::new());
        assert_eq!(to_retire(&made, 1).len(), 5);
    }

    /// Seeded random schedules (the seed is printed; `HORN_CRON_SEED` replays one):
    /// the next firing found by the day-then-minute search is the first minute a
    /// scan of every minute finds matching, within 60 days.
    #[test]
    fn the_search_agrees_with_a_scan_of_every_minute() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let seed: u64 = std::env::var("HORN_CRON_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("cron search: seed {seed} (HORN_CRON_SEED={seed} replays it)");
        let mut rng = SmallRng::seed_from_u64(seed);
        let pick = |lo: u32, hi: u32, rng: &mut SmallRng| -> String {
            match rng.gen_range(0..4) {
                0 => "*".to_string(),
                1 => rng.gen_range(lo..=hi).to_string(),
                2 => {
                    let a = rng.gen_range(lo..=hi);
                    format!("{a}-{}", rng.gen_range(a..=hi))
                }
                _ => format!("*/{}", rng.gen_range(1..=(hi - lo + 1).min(12))),
            }
        };
        for _ in 0..300 {
            let text = format!(
                "{} {} {} {} {}",
                pick(0, 59, &mut rng),
                pick(0, 23, &mut rng),
                pick(1, 31, &mut rng),
                pick(1, 12, &mut rng),
                pick(0, 7, &mut rng)
            );
            let s: Schedule = text.parse().unwrap();
            let t = at(2026, 1, 1, 0, 0) + rng.gen_range(0..4 * 365 * 86_400);
            let matches = |minute: u64| {
                let day = (minute / 1440) as i64;
                let (h, m) = ((minute % 1440 / 60) as u32, (minute % 60) as u32);
                s.day_matches(day) && s.hours.contains(&h) && s.minutes.contains(&m)
            };
            let scanned = (t / 60 + 1..t / 60 + 1 + 60 * 1440)
                .find(|&m| matches(m))
                .map(|m| m * 60);
            let found = s.next_after(t);
            match scanned {
                Some(want) => assert_eq!(found, Some(want), "{text} after {t} (seed {seed})"),
                None => assert!(
                    found.is_none_or(|f| f > t + 60 * 86_400),
                    "{text} after {t} (seed {seed})"
                ),
            }
        }
    }
}
