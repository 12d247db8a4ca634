//! # horn-iscsi: a native iSCSI target
//!
//! Serves a Horn volume as an iSCSI LUN (RFC 7143, SCSI block commands SBC-3 and
//! primary commands SPC-4), for hosts without ublk: older kernels, other operating
//! systems, VMs. Written here rather than wrapping tgt, so that a command goes from
//! the initiator's socket to the replicas' sockets on one thread and one io_uring.
//!
//! - [`pdu`]: the wire format, framing and digests;
//! - [`text`]: text keys and the negotiation of session parameters;
//! - [`login`]: the login phase, with CHAP;
//! - [`scsi`]: the SCSI commands, on a [`horn_engine::frontend::BlockVolume`];
//! - [`target`]: the target's shared state: its name, LUN, engine and sessions;
//! - `outbox`: the PDUs a session sends, and its sequence numbers;
//! - `task`: a session's SCSI commands, from Command PDU (and data-out) to status;
//! - [`session`]: a session's full feature phase, its socket, engine queue and
//!   commands on one ring;
//! - [`conn`]: one connection from accept to close (login, discovery, session);
//! - [`listener`]: accepting connections, a thread each.
//!
//! Each module imports only from those listed before it.
//!
//! Dependency note: `md-5` computes CHAP responses (RFC 1994 fixes MD5).

#![warn(missing_docs)]

pub mod conn;
pub mod listener;
pub mod login;
mod outbox;
pub mod pdu;
pub mod scsi;
pub mod session;
pub mod target;
mod task;
pub mod text;
