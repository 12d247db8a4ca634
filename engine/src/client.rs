//! The replicas' control services as the engine calls them: one way to connect, one
//! way to turn a refusal into an error that names the replica, and [`Peer`], a
//! connected replica with its addresses for messages.
//!
//! Every control call of the engine (claims, records, chain operations,
//! reconciliation, verify, intent clearing, rebuild) connects through here, and every
//! connection carries a deadline: the connect and each call on it end within
//! [`Deadline`], so a hung replica costs the caller that long and no more. The caller
//! then drops the replica (durably, through the keeper) and goes on.

use std::time::Duration;

use horn_proto::auth::{GenerationKey, AUTH_HEADER};
use horn_proto::control::replica_control_client::ReplicaControlClient;
use horn_proto::control::ENGINE_HEADER;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::types::{Result, VolumeError};

/// A replica's control client; every call names the engine making it, and proves
/// it holds the generation's key when the engine has one.
pub(crate) type ControlClient = ReplicaControlClient<InterceptedService<Channel, Caller>>;

/// Who makes a control call: the engine's identity, in every call's
/// [`ENGINE_HEADER`] (a replica takes calls at its own generation only from the
/// engine holding the claim at it), and the proof of its generation's key in
/// [`AUTH_HEADER`] (a replica that holds its volume's secret takes no other call).
#[derive(Clone)]
pub(crate) struct Caller {
    engine: AsciiMetadataValue,
    proof: Option<AsciiMetadataValue>,
    /// Over TLS with this configuration (the node's certificate), where the
    /// cluster's services speak it; plaintext otherwise.
    tls: Option<horn_proto::auth::ClientTls>,
    /// The data wire over TLS: where to connect for each replica.
    pub(crate) data: Option<horn_proto::auth::DataDial>,
}

impl Caller {
    /// Engine `engine`, proving `key` if given, over `tls` if given.
    pub(crate) fn new(
        engine: &str,
        key: Option<&GenerationKey>,
        tls: Option<horn_proto::auth::ClientTls>,
    ) -> Result<Caller> {
        let bad = || VolumeError::Control {
            replica: String::new(),
            code: tonic::Code::InvalidArgument,
            message: format!("the engine identity {engine:?} is not printable ASCII"),
        };
        let proof = key
            .map(|k| AsciiMetadataValue::try_from(k.control_header(engine)).map_err(|_| bad()))
            .transpose()?;
        Ok(Caller {
            engine: AsciiMetadataValue::try_from(engine).map_err(|_| bad())?,
            proof,
            tls,
            data: None,
        })
    }

    /// The caller, reaching replicas' data wires through `data` if given.
    pub(crate) fn with_data(mut self, data: Option<horn_proto::auth::DataDial>) -> Caller {
        self.data = data;
        self
    }
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Caller({:?}, proof: {}, tls: {})",
            self.engine,
            self.proof.is_some(),
            self.tls.is_some()
        )
    }
}

impl tonic::service::Interceptor for Caller {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(ENGINE_HEADER, self.engine.clone());
        if let Some(p) = &self.proof {
            req.metadata_mut().insert(AUTH_HEADER, p.clone());
        }
        Ok(req)
    }
}

/// How long a connect, and each call on the connection, may take.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Deadline {
    /// A call that does one small thing (info, claim, record, intents, blocks): the
    /// engine's replica timeout.
    Call(Duration),
    /// A chain operation, which may fold a large layer: four replica timeouts, at
    /// least 10 s.
    Chain(Duration),
    /// A rebuild's transfer, which runs as long as the data takes: only the connect
    /// has a deadline (its progress is watched through `Info` calls, which do).
    Transfer(Duration),
}

impl Deadline {
    fn connect(self) -> Duration {
        match self {
            Deadline::Call(t) | Deadline::Transfer(t) => t,
            Deadline::Chain(t) => t,
        }
    }

    fn call(self) -> Option<Duration> {
        match self {
            Deadline::Call(t) => Some(t),
            Deadline::Chain(t) => Some((t * 4).max(Duration::from_secs(10))),
            Deadline::Transfer(_) => None,
        }
    }
}

/// Connects to a replica's control service as `caller`, within `deadline`.
pub(crate) async fn connect(control: &str, caller: &Caller, deadline: Deadline) -> Result<ControlClient> {
    let unavailable = |message: String| VolumeError::Control {
        replica: control.to_string(),
        code: tonic::Code::Unavailable,
        message,
    };
    let scheme = if caller.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{control}"))
        .map_err(|e| unavailable(format!("not a control address: {e}")))?
        .connect_timeout(deadline.connect());
    if let Some(tls) = &caller.tls {
        endpoint = endpoint
            .tls_config(tls.config())
            .map_err(|e| unavailable(format!("the TLS configuration is refused: {e}")))?;
    }
    if let Some(t) = deadline.call() {
        endpoint = endpoint.timeout(t);
    }
    match tokio::time::timeout(deadline.connect(), endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(ReplicaControlClient::with_interceptor(channel, caller.clone())),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Err(_) => Err(unavailable(format!(
            "it did not accept a connection within {:?}",
            deadline.connect()
        ))),
    }
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
    /// Index in the engine's replicas.
    pub(crate) index: usize,
    /// Control address.
    pub(crate) control: String,
    /// Data address (the replica's name in reports).
    pub(crate) data: String,
    pub(crate) client: ControlClient,
}
