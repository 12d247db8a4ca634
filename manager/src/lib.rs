//! # horn-manager: Horn's control plane and its command-line tools
//!
//! Today this crate holds the daemons' bodies ([`daemon`], behind `hornd`: a replica
//! server, an engine with its ublk or iSCSI frontend), what `hornctl` needs to manage
//! replica directories and engines, and the formatting shared by Horn's command-line
//! output: byte sizes and times for people, JSON for scripts. The control plane lands
//! here piece by piece: the [`store`] that keeps the manager's specs (compare-and-swap,
//! revisions, leases, watches; an embedded database file by default) and the
//! [`scheduler`] that places replicas (pure rules, property-tested), the manager's
//! objects ([`model`]), its API with its loops ([`api`]: the reconciler, recurring
//! jobs, restores from backups), the node agent ([`agent`]) and the command lines
//! ([`ctl`], [`backupctl`], [`jobctl`]). Replication, rebuild and reconciliation of
//! data stay in the engine.
//!
//! It must never hold data-path logic: it calls `horn-replica` and `horn-engine` and
//! turns their typed errors into messages at the edge.

#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod authority;
pub mod backupctl;
pub mod backups;
pub mod ctl;
pub mod daemon;
pub mod format;
pub mod instances;
pub mod jobctl;
pub mod jobs;
pub mod join;
pub mod logfile;
pub mod model;
pub mod policy;
pub mod runtime;
pub mod scheduled;
pub mod scheduler;
pub mod store;
pub mod supervise;
