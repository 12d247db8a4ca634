//! `hornctl backup-target ...` and `hornctl job ...`: the cluster's backup targets
//! and its recurring snapshot and backup jobs, kept and run by the manager.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Subcommand;
use horn_proto::manager_api as pb;
use serde_json::json;

use crate::ctl::{connect, parse_label, refused, runtime, ManagerAddr};
use crate::format::{table, utc_time};

/// `hornctl backup-target ...`
#[derive(Subcommand, Debug)]
pub enum BackupTargetCmd {
    /// Add a backup target, or replace the one of that name. It is reached (listed)
    /// before it is kept: a wrong key, a missing bucket or a dead endpoint is refused.
    Add {
        /// Its name: 1-63 of A-Z a-z 0-9 . _ -
        name: String,
        /// file:///PATH (a directory every node mounts: a local disk in one-node
        /// clusters, NFS or CIFS) or s3://BUCKET[/PREFIX].
        url: String,
        /// S3: the endpoint, the region, and the credentials (a file of
        /// AWS_ACCESS_KEY_ID= and AWS_SECRET_ACCESS_KEY= lines, else the
        /// environment's). The manager keeps the secret and hands it to the engine
        /// making a backup only.
        #[command(flatten)]
        s3: S3Flags,
    },
    /// The cluster's backup targets (without their secrets).
    List,
    /// Forget a backup target (refused while a job or a restoring volume uses it);
    /// its backups stay where they are.
    Remove {
        /// Its name.
        name: String,
    },
}

/// A target's S3 settings.
#[derive(clap::Args, Debug, Clone)]
pub struct S3Flags {
    /// S3: the service's endpoint (e.g. http://127.0.0.1:3900); default AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    s3_endpoint: Option<String>,
    /// S3: the region (Garage's is `garage`).
    #[arg(long, env = "AWS_REGION")]
    s3_region: Option<String>,
    /// S3: the credentials file.
    #[arg(long, value_name = "FILE")]
    s3_credentials_file: Option<std::path::PathBuf>,
}

/// `hornctl job ...`
#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Create a recurring job, or replace the one of that name (its history stays).
    Create {
        /// Its name; what it makes is named JOB-TIME-RUN and labelled horn.job=JOB.
        name: String,
        /// snapshot or backup.
        #[arg(long)]
        task: String,
        /// When it runs: five-field cron, UTC ("0 2 * * *": 02:00 every day).
        #[arg(long)]
        cron: String,
        /// How many of the snapshots or backups it made to keep per volume; older
        /// ones are deleted after each run (0: keep all).
        #[arg(long)]
        retain: u32,
        /// A volume it runs on; repeat for more.
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// A job group: it runs on every volume in it (`hornctl volume groups`);
        /// repeat for more.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// A backup job's target (`hornctl backup-target list`).
        #[arg(long)]
        target: Option<String>,
        /// A label KEY=VALUE for what it makes; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Every job: its schedule, when it runs next, and its last run.
    List,
    /// A job's last runs (32 are kept): what each made and retired on each volume.
    History {
        /// The job's name.
        name: String,
    },
    /// Run a job now, outside its schedule; waits for the run (or --timeout).
    Run {
        /// The job's name.
        name: String,
        /// Seconds to wait for the run to end (0: do not wait).
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Delete a job and its history (what it made stays).
    Delete {
        /// The job's name.
        name: String,
    },
}

/// Runs `hornctl backup-target CMD`.
pub fn run_backup_target(addr: ManagerAddr, cmd: BackupTargetCmd) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = connect(&addr).await?;
        match cmd {
            BackupTargetCmd::Add { name, url, s3 } => {
                let s = crate::backupctl::TargetArgs {
                    target: Some(url.clone()),
                    s3_endpoint: s3.s3_endpoint,
                    s3_region: s3.s3_region,
                    s3_credentials_file: s3.s3_credentials_file,
                }
                .s3()?;
                let t = c
                    .put_backup_target(pb::BackupTargetSpec {
                        name,
                        url,
                        endpoint: s.endpoint,
                        region: s.region,
                        access_key: s.access_key,
                        secret_key: s.secret_key,
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                show(addr.json, target_json(&t), || {
                    format!("backup target {} is {}", t.name, t.url)
                });
            }
            BackupTargetCmd::List => {
                let list = c
                    .list_backup_targets(pb::ListBackupTargetsRequest {})
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!(
                        "{}",
                        json!(list.targets.iter().map(target_json).collect::<Vec<_>>())
                    );
                } else {
                    let rows: Vec<Vec<String>> = list
                        .targets
                        .iter()
                        .map(|t| {
                            vec![
                                t.name.clone(),
                                t.url.clone(),
                                dash(&t.endpoint),
                                dash(&t.region),
                                dash(&t.access_key),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(&["NAME", "URL", "ENDPOINT", "REGION", "ACCESS KEY"], &rows)
                    );
                }
            }
            BackupTargetCmd::Remove { name } => {
                let t = c
                    .delete_backup_target(pb::BackupTargetRef { name })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                show(addr.json, target_json(&t), || {
                    format!("backup target {} removed (its backups stay in {})", t.name, t.url)
                });
            }
        }
        Ok(())
    })
}

/// Runs `hornctl job CMD`.
pub fn run_job(addr: ManagerAddr, cmd: JobCmd) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = connect(&addr).await?;
        match cmd {
            JobCmd::Create {
                name,
                task,
                cron,
                retain,
                volumes,
                groups,
                target,
                labels,
            } => {
                let j = c
                    .put_job(pb::Job {
                        name,
                        task,
                        cron,
                        retain,
                        volumes,
                        groups,
                        target: target.unwrap_or_default(),
                        labels: labels
                            .into_iter()
                            .collect::<BTreeMap<_, _>>()
                            .into_iter()
                            .collect(),
                        ..Default::default()
                    })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                show(addr.json, job_json(&j), || {
                    format!(
                        "job {} ({}, \"{}\", retain {}) runs next at {}",
                        j.name,
                        j.task,
                        j.cron,
                        j.retain,
                        utc_time(j.next_unix)
                    )
                });
            }
            JobCmd::List => {
                let list = c
                    .list_jobs(pb::ListJobsRequest {})
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!("{}", json!(list.jobs.iter().map(job_json).collect::<Vec<_>>()));
                } else {
                    let rows: Vec<Vec<String>> = list
                        .jobs
                        .iter()
                        .map(|j| {
                            let mut on: Vec<String> = j.volumes.clone();
                            on.extend(j.groups.iter().map(|g| format!("group:{g}")));
                            vec![
                                j.name.clone(),
                                j.task.clone(),
                                j.cron.clone(),
                                j.retain.to_string(),
                                on.join(","),
                                dash(&j.target),
                                utc_time(j.next_unix),
                                dash(&j.last_run),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(
                            &["NAME", "TASK", "CRON", "RETAIN", "ON", "TARGET", "NEXT", "LAST RUN"],
                            &rows
                        )
                    );
                }
            }
            JobCmd::History { name } => {
                let list = c
                    .job_history(pb::JobRef { name: name.clone() })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if addr.json {
                    println!("{}", json!(list.runs.iter().map(run_json).collect::<Vec<_>>()));
                } else if list.runs.is_empty() {
                    println!("job {name} has not run yet");
                } else {
                    let rows: Vec<Vec<String>> = list
                        .runs
                        .iter()
                        .flat_map(|r| {
                            r.volumes.iter().map(move |v| {
                                vec![
                                    r.number.to_string(),
                                    r.trigger.clone(),
                                    utc_time(r.started_unix),
                                    format!("{} s", r.finished_unix.saturating_sub(r.started_unix)),
                                    v.volume.clone(),
                                    v.outcome.clone(),
                                    dash(&v.made),
                                    dash(&v.retired.join(",")),
                                    dash(&v.message),
                                ]
                            })
                        })
                        .collect();
                    print!(
                        "{}",
                        table(
                            &[
                                "RUN", "TRIGGER", "STARTED", "TOOK", "VOLUME", "OUTCOME", "MADE", "RETIRED",
                                "MESSAGE"
                            ],
                            &rows
                        )
                    );
                }
            }
            JobCmd::Run { name, timeout } => {
                let started = c
                    .run_job(pb::JobRef { name: name.clone() })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                if timeout == 0 {
                    if addr.json {
                        println!("{}", run_json(&started));
                    } else {
                        println!("job {name}: run {} started", started.number);
                    }
                    return Ok(());
                }
                let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
                let run = loop {
                    let list = c
                        .job_history(pb::JobRef { name: name.clone() })
                        .await
                        .map_err(refused(&addr))?
                        .into_inner();
                    if let Some(r) = list.runs.into_iter().find(|r| r.number == started.number) {
                        break r;
                    }
                    if std::time::Instant::now() >= deadline {
                        bail!(
                            "job {name}'s run {} has not ended after {timeout} s",
                            started.number
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                };
                if addr.json {
                    println!("{}", run_json(&run));
                } else {
                    for v in &run.volumes {
                        println!(
                            "run {} on {}: {}{}{}{}",
                            run.number,
                            v.volume,
                            v.outcome,
                            if v.made.is_empty() {
                                String::new()
                            } else {
                                format!(", made {}", v.made)
                            },
                            if v.retired.is_empty() {
                                String::new()
                            } else {
                                format!(", retired {}", v.retired.join(", "))
                            },
                            if v.message.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", v.message)
                            },
                        );
                    }
                    if run.volumes.is_empty() {
                        println!("run {}: the job selects no volume", run.number);
                    }
                }
                let failed = run.volumes.iter().filter(|v| v.outcome == "failed").count();
                if failed > 0 {
                    bail!("job {name}'s run {} failed on {failed} volume(s)", run.number);
                }
            }
            JobCmd::Delete { name } => {
                let j = c
                    .delete_job(pb::JobRef { name })
                    .await
                    .map_err(refused(&addr))?
                    .into_inner();
                show(addr.json, job_json(&j), || {
                    format!("job {} deleted (what it made stays)", j.name)
                });
            }
        }
        Ok(())
    })
}

/// Prints `value` as JSON, or `text` for people.
fn show(json: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn target_json(t: &pb::BackupTargetInfo) -> serde_json::Value {
    json!({
        "name": t.name, "url": t.url,
        "endpoint": (!t.endpoint.is_empty()).then_some(&t.endpoint),
        "region": (!t.region.is_empty()).then_some(&t.region),
        "access_key": (!t.access_key.is_empty()).then_some(&t.access_key),
    })
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    json!({
        "name": j.name, "task": j.task, "cron": j.cron, "retain": j.retain,
        "volumes": j.volumes, "groups": j.groups,
        "target": (!j.target.is_empty()).then_some(&j.target),
        "labels": j.labels, "next_unix": j.next_unix,
        "last_run": (!j.last_run.is_empty()).then_some(&j.last_run),
    })
}

fn run_json(r: &pb::JobRun) -> serde_json::Value {
    json!({
        "job": r.job, "number": r.number, "trigger": r.trigger,
        "started_unix": r.started_unix, "finished_unix": r.finished_unix,
        "volumes": r.volumes.iter().map(|v| json!({
            "volume": v.volume, "outcome": v.outcome,
            "made": (!v.made.is_empty()).then_some(&v.made),
            "retired": v.retired,
            "message": (!v.message.is_empty()).then_some(&v.message),
        })).collect::<Vec<_>>(),
    })
}
