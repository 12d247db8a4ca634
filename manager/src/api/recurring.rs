//! Recurring jobs as the manager runs them: each job's cron schedule is looked at
//! every few seconds; a due job (or one run by hand, `RunJob`) snapshots each volume
//! it selects through the volume's engine, backs the snapshot up for a backup job,
//! then retires what its retain count lets go ([`crate::jobs`] decides which). Each
//! run is recorded in the job's history in the store.
//!
//! A job runs one run at a time, on a thread of its own; a firing that comes while
//! it runs, or several missed while the manager was down, make one run.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tonic::Status;

use super::{to_status, unix_now, ManagerService};
use crate::jobs::{to_retire, Made, Schedule};
use crate::model::{JobRun, JobSpec, JobTask, JobVolumeRun, VolumeSpec, JOB_HISTORY, JOB_LABEL};
use crate::store::Store;

/// How often the job loop looks at the schedules.
const TICK: Duration = Duration::from_secs(2);

/// How long a collection after retiring backups waits for running backups.
const GC_WAIT: Duration = Duration::from_secs(120);

impl<S: Store + 'static> ManagerService<S> {
    /// Starts the job loop; it ends when the service is dropped.
    pub(super) fn spawn_jobs(self: &Arc<Self>) -> std::io::Result<()> {
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("jobs".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(m) = me.upgrade() else { return };
                if let Err(e) = m.fire_due_jobs(unix_now(), &me) {
                    tracing::warn!(error = %e.message(), "looking at the jobs' schedules failed; trying again");
                }
            })?;
        Ok(())
    }

    /// Starts a run of every job whose schedule has fired since it last ran.
    fn fire_due_jobs(&self, now: u64, me: &Weak<Self>) -> Result<(), Status> {
        for job in self.specs.jobs().map_err(to_status)? {
            let state = self.specs.job_state(&job.spec.name).map_err(to_status)?;
            let schedule: Schedule = job.spec.cron.parse().map_err(Status::internal)?;
            let due = schedule
                .next_after(state.spec.fired_through)
                .is_some_and(|next| next <= now);
            if !due {
                continue;
            }
            let mut fired = state.spec.clone();
            fired.fired_through = now;
            // Recorded first: a manager that stops mid-run does not run it again.
            if self
                .specs
                .put_job_state(&job.spec.name, &fired, state.revision)
                .is_err()
            {
                continue;
            }
            match self.start_run(&job.spec.name, "schedule", me) {
                Ok(n) => tracing::info!(job = %job.spec.name, run = n, "job fired"),
                Err(e) => {
                    tracing::warn!(job = %job.spec.name, error = %e.message(), "a job's firing is skipped")
                }
            }
        }
        Ok(())
    }

    /// Starts a run of job `name` on a thread of its own; its number, or why not.
    pub(super) fn start_run(&self, name: &str, trigger: &str, me: &Weak<Self>) -> Result<u64, Status> {
        let job = self.specs.job(name).map_err(to_status)?.spec;
        let number = {
            let mut running = self.jobs_running.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = running.get(name) {
                return Err(Status::failed_precondition(format!(
                    "job {name} is running (run {n}): wait for it"
                )));
            }
            let n = self.specs.job_state(name).map_err(to_status)?.spec.runs + 1;
            running.insert(name.to_string(), n);
            n
        };
        let (me, trigger) = (me.clone(), trigger.to_string());
        let started = std::thread::Builder::new()
            .name(format!("job {name}"))
            .spawn(move || {
                let Some(m) = me.upgrade() else { return };
                let run = m.run_job(&job, number, &trigger);
                if let Err(e) = m.record_run(&job.name, run) {
                    tracing::warn!(job = %job.name, run = number, error = %e.message(), "a job's run could not be recorded");
                }
                m.jobs_running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&job.name);
            });
        if let Err(e) = started {
            self.jobs_running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            return Err(Status::internal(format!("cannot start job {name}'s run: {e}")));
        }
        Ok(number)
    }

    /// The run of `job` in progress, if any: its number.
    pub(super) fn running_run(&self, job: &str) -> Option<u64> {
        self.jobs_running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job)
            .copied()
    }

    /// Adds `run` to job `name`'s history (kept to [`JOB_HISTORY`] runs).
    fn record_run(&self, name: &str, run: JobRun) -> Result<(), Status> {
        loop {
            let state = self.specs.job_state(name).map_err(to_status)?;
            let mut s = state.spec;
            s.runs = s.runs.max(run.number);
            s.history.push(run.clone());
            let extra = s.history.len().saturating_sub(JOB_HISTORY);
            s.history.drain(..extra);
            match self.specs.put_job_state(name, &s, state.revision) {
                Ok(_) => return Ok(()),
                Err(crate::model::SpecError::Store(crate::store::StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(to_status(e)),
            }
        }
    }

    /// Runs `job` once on every volume it selects.
    fn run_job(&self, job: &JobSpec, number: u64, trigger: &str) -> JobRun {
        let started_unix = unix_now();
        let mut volumes = Vec::new();
        match self.specs.volumes() {
            Ok(all) => {
                for v in all.into_iter().filter(|v| job.selects(&v.spec)) {
                    volumes.push(self.run_on(job, number, started_unix, &v.spec));
                }
            }
            Err(e) => volumes.push(JobVolumeRun {
                volume: String::new(),
                outcome: "failed".into(),
                made: String::new(),
                retired: Vec::new(),
                message: format!("cannot read the volumes: {e}"),
            }),
        }
        for v in &volumes {
            tracing::info!(job = %job.name, run = number, volume = %v.volume, outcome = %v.outcome, made = %v.made, retired = ?v.retired, message = %v.message, "job run on a volume");
        }
        JobRun {
            number,
            trigger: trigger.to_string(),
            started_unix,
            finished_unix: unix_now(),
            volumes,
        }
    }

    /// One volume's part of a run.
    fn run_on(&self, job: &JobSpec, number: u64, at: u64, v: &VolumeSpec) -> JobVolumeRun {
        let mut out = JobVolumeRun {
            volume: v.name.clone(),
            outcome: "done".into(),
            made: String::new(),
            retired: Vec::new(),
            message: String::new(),
        };
        if v.restore.is_some() {
            out.outcome = "skipped".into();
            out.message = "it is being restored from a backup".into();
            return out;
        }
        let control = match self.engine_of(&v.name) {
            Ok((control, _)) => control,
            Err(e) => {
                out.outcome = "skipped".into();
                out.message = e.message().to_string();
                return out;
            }
        };
        let target = match job.task {
            JobTask::Snapshot => None,
            JobTask::Backup => {
                let name = job.target.as_deref().unwrap_or_default();
                match self.specs.backup_target(name) {
                    Ok(t) => Some(t.spec),
                    Err(e) => {
                        out.outcome = "failed".into();
                        out.message = e.to_string();
                        return out;
                    }
                }
            }
        };
        let name = made_name(&job.name, at, number);
        let mut labels = job.labels.clone();
        labels.insert(JOB_LABEL.into(), job.name.clone());
        let tls = self.engine_tls();
        let made = super::on_runtime(async {
            let mut c = super::long_engine_client(&control, tls).await?;
            c.snapshot(horn_proto::engine_control::EngineSnapshotRequest {
                name: name.clone(),
                labels: labels.clone().into_iter().collect(),
            })
            .await
            .map_err(|s| format!("snapshot {name}: {}", s.message()))?;
            if let Some(t) = &target {
                let stream = c
                    .backup(horn_proto::control::BackupRequest {
                        snapshot: name.clone(),
                        volume: v.name.clone(),
                        name: name.clone(),
                        target: Some(t.wire()),
                        labels: labels.into_iter().collect(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| format!("backup {name} to {}: {}", t.name, s.message()))?
                    .into_inner();
                crate::backupctl::follow(stream, &indicatif::ProgressBar::hidden())
                    .await
                    .map_err(|e| format!("backup {name} to {}: {e:#}", t.name))?;
            }
            Ok::<_, String>(())
        });
        if let Err(e) = made {
            out.outcome = "failed".into();
            out.message = e;
            return out;
        }
        out.made = name;
        if let Err(e) = self.retire(job, v, &control, target.as_ref(), &mut out.retired) {
            out.message = format!("retiring: {e}");
        }
        out
    }

    /// Deletes the snapshots (and, for a backup job, the backups) of `v` that `job`
    /// made beyond its retain count; those deleted go into `retired`.
    fn retire(
        &self,
        job: &JobSpec,
        v: &VolumeSpec,
        control: &str,
        target: Option<&crate::model::BackupTargetSpec>,
        retired: &mut Vec<String>,
    ) -> Result<(), String> {
        let retain = job.retain as usize;
        if retain == 0 {
            return Ok(());
        }
        let tls = self.engine_tls();
        super::on_runtime(async {
            let mut c = super::long_engine_client(control, tls).await?;
            let snaps = c
                .list_snapshots(horn_proto::engine_control::ListSnapshotsRequest {})
                .await
                .map_err(|s| format!("listing snapshots: {}", s.message()))?
                .into_inner()
                .snapshots;
            let made: Vec<Made> = snaps
                .iter()
                .filter(|s| s.in_chain && !s.removed && s.labels.get(JOB_LABEL) == Some(&job.name))
                .map(|s| Made {
                    name: s.name.clone(),
                    created_unix: s.created,
                })
                .collect();
            let old = to_retire(&made, retain);
            for name in &old {
                c.delete_snapshot(horn_proto::engine_control::EngineDeleteRequest { name: name.clone() })
                    .await
                    .map_err(|s| format!("deleting snapshot {name}: {}", s.message()))?;
            }
            if !old.is_empty() {
                c.purge(horn_proto::engine_control::EnginePurgeRequest {})
                    .await
                    .map_err(|s| format!("purging: {}", s.message()))?;
            }
            if target.is_none() {
                retired.extend(old);
            }
            Ok::<_, String>(())
        })?;
        let Some(t) = target else { return Ok(()) };
        let store = t.open()?;
        let backups = horn_backup::list_backups(store.as_ref(), &v.name).map_err(|e| e.to_string())?;
        let made: Vec<Made> = backups
            .iter()
            .filter(|m| m.labels.get(JOB_LABEL) == Some(&job.name))
            .map(|m| Made {
                name: m.name.clone(),
                created_unix: m.created_unix,
            })
            .collect();
        let old = to_retire(&made, retain);
        for name in &old {
            horn_backup::gc::delete_backup(store.as_ref(), &v.name, name)
                .map_err(|e| format!("deleting backup {name}: {e}"))?;
            retired.push(name.clone());
        }
        if !old.is_empty() {
            let g =
                horn_backup::gc::collect(store, GC_WAIT).map_err(|e| format!("collecting blocks: {e}"))?;
            tracing::info!(job = %job.name, target = %t.name, deleted = g.deleted, "blocks no backup names collected");
        }
        Ok(())
    }
}

/// The name of what run `number` of job `job` makes at `at`:
/// `JOB-YYYYMMDDTHHMMSSZ-N`, the job's name cut to fit 63 characters.
fn made_name(job: &str, at: u64, number: u64) -> String {
    let tail = format!("-{}-{number}", crate::format::utc_stamp(at));
    let keep = 63usize.saturating_sub(tail.len()).min(job.len());
    format!("{}{tail}", &job[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_run_makes_is_named_by_job_time_and_number() {
        assert_eq!(
            made_name("nightly", 1_764_931_200, 7),
            "nightly-20251205T104000Z-7"
        );
        let long = "j".repeat(63);
        let n = made_name(&long, 0, 123_456);
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("-19700101T000000Z-123456"), "{n}");
        crate::model::check_name("snapshot", &n).unwrap();
    }
}
