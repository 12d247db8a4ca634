//! # horn-manager: Horn's control plane and its command-line tools
//!
//! Today this crate holds what `hornctl` needs to manage replica directories on the
//! local machine (offline: no daemon involved) and the formatting shared by Horn's
//! command-line output: byte sizes and times for people, JSON for scripts. The
//! scheduler, health checks, rebuild and recurring jobs land here as the engine and
//! replica server arrive.
//!
//! It must never hold data-path logic: it calls `horn-replica` (and later the engine)
//! and turns their typed errors into messages at the edge.

#![warn(missing_docs)]

pub mod format;
