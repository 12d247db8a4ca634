//! # horn-manager: Horn's control plane and its command-line tools
//!
//! Today this crate holds the daemons' bodies ([`daemon`], behind `hornd`), what
//! `hornctl` needs to manage replica directories on the local machine, and the
//! formatting shared by Horn's command-line output: byte sizes and times for people,
//! JSON for scripts. The
//! scheduler, health checks, rebuild and recurring jobs land here as the engine and
//! replica server arrive.
//!
//! It must never hold data-path logic: it calls `horn-replica` (and later the engine)
//! and turns their typed errors into messages at the edge.

#![warn(missing_docs)]

pub mod daemon;
pub mod format;
