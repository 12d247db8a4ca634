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
//! - [`conn`]: one connection's loop (socket, engine queue, SCSI tasks on one ring);
//! - [`target`]: the listener, sessions and the target's shared state.
//!
//! Dependency note: `md-5` computes CHAP responses (RFC 1994 fixes MD5).

#![warn(missing_docs)]

pub mod conn;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod target;
pub mod text;
