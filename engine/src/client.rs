//! The replicas' control services as the engine calls them: one way to connect, one
//! way to turn a refusal into an error that names the replica, and [`Peer`], a
//! connected replica with its addresses for messages.
//!
//! Every control call of the engine (claims, chain operations, reconciliation,
//! verify, rebuild) connects through here, so a rule about them (a deadline, an
//! identity) has one place to go.

use horn_proto::control::replica_control_client::ReplicaControlClient;
use tonic::transport::Channel;

use crate::types::{Result, VolumeError};

/// A replica's control client.
pub(crate) type ControlClient = ReplicaControlClient<Channel>;

/// Connects to a replica's control service.
pub(crate) async fn connect(control: &str) -> Result<ControlClient> {
    ReplicaControlClient::connect(format!("http://{control}"))
        .await
        .map_err(|e| VolumeError::Control {
            replica: control.to_string(),
            code: tonic::Code::Unavailable,
            message: e.to_string(),
        })
}

/// Maps a replica's gRPC status to an engine error naming the replica.
pub(crate) fn control_err(replica: &str) -> impl FnOnce(tonic::Status) -> VolumeError + '_ {
    move |s| VolumeError::Control {
        replica: replica.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// A replica's control client, with its addresses for messages.
pub(crate) struct Peer {
    /// Control address.
    pub(crate) control: String,
    /// Data address (the replica's name in reports).
    pub(crate) data: String,
    pub(crate) client: ControlClient,
}
