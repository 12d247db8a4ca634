//! Volumes created from a backup (`CreateVolume` with `from_backup`), as the manager
//! restores them. Such a volume is attached in maintenance mode (an engine, no
//! frontend) to the node of one of its replicas; once its engine serves, the backup
//! is restored through it: each block fetched once and written to every replica,
//! blocks already in place skipped, so a restore cut off goes on where it stopped.
//!
//! A plain restore then detaches the volume, which is a normal volume from then on.
//! A standby keeps following: every `backup-poll-interval-secs` it looks for a newer
//! backup of its source and applies it, fetching only the blocks that differ from the
//! one applied last. `ActivateVolume` asks for a last look, after which it too is
//! detached and normal. The backup applied last is kept in the volume's spec.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tonic::Status;

use super::{to_status, ManagerService};
use crate::model::RestoreSpec;
use crate::store::Store;

/// How often the restorer looks at the volumes being restored.
const TICK: Duration = Duration::from_secs(1);

/// Blocks fetched at once.
const PARALLEL: u32 = 16;

impl<S: Store + 'static> ManagerService<S> {
    /// Starts the restorer; it ends when the service is dropped.
    pub(super) fn spawn_restorer(self: &Arc<Self>) -> std::io::Result<()> {
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("restorer".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(m) = me.upgrade() else { return };
                if let Err(e) = m.start_due_restores(&me) {
                    tracing::warn!(error = %e.message(), "looking at the volumes being restored failed; trying again");
                }
            })?;
        Ok(())
    }

    /// Starts a step ([`Self::restore_step`]) for each volume being restored that is
    /// due one and has none running.
    fn start_due_restores(&self, me: &Weak<Self>) -> Result<(), Status> {
        let poll = Duration::from_secs(
            self.specs
                .settings()
                .map_err(to_status)?
                .spec
                .backup_poll_interval_secs,
        );
        let volumes = self.specs.volumes().map_err(to_status)?;
        // Volumes restored (or deleted) since: forgotten, unless a step still runs.
        self.restores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, last| {
                last.is_none()
                    || volumes
                        .iter()
                        .any(|v| &v.spec.name == name && v.spec.restore.is_some())
            });
        for v in volumes {
            let Some(r) = &v.spec.restore else { continue };
            let name = v.spec.name.clone();
            {
                let mut running = self.restores.lock().unwrap_or_else(|p| p.into_inner());
                let last = running.get(&name).copied();
                let due = match last {
                    Some(None) => false, // a step runs
                    Some(Some(at)) => {
                        // Restored once: a standby looks again after the poll interval
                        // (or at once when asked to activate); a failed step is tried
                        // again after a few seconds.
                        let wait = if r.activate {
                            Duration::ZERO
                        } else if r.error.is_some() || r.applied.is_none() {
                            Duration::from_secs(5)
                        } else {
                            poll
                        };
                        at.elapsed() >= wait
                    }
                    None => true,
                };
                if !due || v.spec.attached_to.is_none() || self.engine_of(&name).is_err() {
                    continue;
                }
                running.insert(name.clone(), None);
            }
            let me = me.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("restore {name}"))
                .spawn(move || {
                    let Some(m) = me.upgrade() else { return };
                    if let Err(e) = m.restore_step(&name) {
                        tracing::warn!(volume = %name, error = %e, "restoring from a backup failed; trying again");
                        m.note_restore_error(&name, &e);
                    }
                    m.restores
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name, Some(Instant::now()));
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a restore thread");
                self.restores
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&v.spec.name);
            }
        }
        Ok(())
    }

    /// Restores the backup volume `name` is due (if it does not hold it yet), then,
    /// unless it is a standby still following, makes it a normal volume.
    fn restore_step(&self, name: &str) -> Result<(), String> {
        let v = self.specs.volume(name).map_err(|e| e.to_string())?.spec;
        let Some(r) = v.restore.clone() else { return Ok(()) };
        let target = self
            .specs
            .backup_target(&r.target)
            .map_err(|e| e.to_string())?
            .spec;
        let store = target.open()?;
        let (backup, since) = match &r.backup {
            Some(b) => (b.clone(), None),
            None => {
                let all =
                    horn_backup::backups_by_age(store.as_ref(), &r.volume).map_err(|e| e.to_string())?;
                let newest = all
                    .last()
                    .map(|m| m.name.clone())
                    .ok_or_else(|| format!("volume {} has no backup in target {}", r.volume, r.target))?;
                // The volume holds the backup applied last and nothing else (no
                // frontend): only the blocks that differ from it are compared. Once
                // that backup is gone (a job's retention deleted it), every block is.
                let since = r.applied.clone().filter(|a| all.iter().any(|m| &m.name == a));
                (newest, since)
            }
        };
        if r.applied.as_deref() != Some(backup.as_str()) {
            let (control, _) = self.engine_of(name).map_err(|s| s.message().to_string())?;
            let since = since.unwrap_or_default();
            let req = horn_proto::engine_control::RestoreRequest {
                target: Some(target.wire()),
                volume: r.volume.clone(),
                backup: backup.clone(),
                strict: false,
                parallel: PARALLEL,
                since,
            };
            let tls = self.engine_tls();
            let report = super::on_runtime(async {
                let mut c = super::long_engine_client(&control, tls).await?;
                let stream = c
                    .restore(req)
                    .await
                    .map_err(|s| s.message().to_string())?
                    .into_inner();
                crate::backupctl::follow(stream, &indicatif::ProgressBar::hidden())
                    .await
                    .map_err(|e| format!("{e:#}"))
            })?;
            let report: horn_backup::restore::RestoreReport =
                serde_json::from_str(&report).map_err(|e| format!("the engine's restore report: {e}"))?;
            if !report.bad.is_empty() {
                let first: Vec<String> = report.bad.iter().take(3).map(|b| b.to_string()).collect();
                return Err(format!(
                    "backup {backup}: {} block(s) could not be restored ({}{}); every other block was. \
                     `hornctl backup verify` finds them; a `--full` backup of the source sends them again",
                    report.bad.len(),
                    first.join("; "),
                    if report.bad.len() > 3 { "; ..." } else { "" }
                ));
            }
            tracing::info!(volume = %name, backup = %backup, restored = report.restored, already_there = report.already_there, seconds = report.seconds, "backup restored");
        }
        let now = self
            .change_volume(name, |spec| {
                let Some(r) = spec.restore.as_mut() else { return };
                r.applied = Some(backup.clone());
                r.error = None;
                if !r.standby || r.activate {
                    spec.restore = None;
                    spec.attached_to = None;
                    spec.maintenance = false;
                }
            })
            .map_err(|e| e.to_string())?;
        if now.restore.is_none() {
            tracing::info!(volume = %name, backup = %backup, "restored from its backup: a normal volume now, detached");
        }
        Ok(())
    }

    fn note_restore_error(&self, name: &str, error: &str) {
        let _ = self.change_volume(name, |spec| {
            if let Some(r) = spec.restore.as_mut() {
                r.error = Some(error.to_string());
            }
        });
    }
}

/// The restore `text` asks for (`TARGET?volume=V[&backup=B]`), its target resolved
/// among `targets` by name or URL, and the backup's manifest (the newest if none is
/// named).
pub(super) fn resolve(
    text: &str,
    standby: bool,
    targets: &[crate::model::BackupTargetSpec],
) -> Result<(RestoreSpec, horn_backup::format::Manifest), Status> {
    let mut r = RestoreSpec::parse(text, standby).map_err(Status::invalid_argument)?;
    let t = targets
        .iter()
        .find(|t| t.name == r.target || t.url == r.target)
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "no backup target {:?}: add it first (`hornctl backup-target add NAME URL`)",
                r.target
            ))
        })?;
    r.target = t.name.clone();
    let store = t.open().map_err(Status::failed_precondition)?;
    let manifest = match &r.backup {
        Some(b) => horn_backup::read_backup(store.as_ref(), &r.volume, b),
        None => horn_backup::backups_by_age(store.as_ref(), &r.volume).and_then(|mut all| {
            all.pop().ok_or_else(|| {
                horn_backup::BackupError::Invalid(format!(
                    "volume {} has no backup in target {}",
                    r.volume, t.name
                ))
            })
        }),
    }
    .map_err(|e| Status::failed_precondition(e.to_string()))?;
    Ok((r, manifest))
}
