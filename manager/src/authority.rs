//! The manager as an engine's membership authority, from the engine's side: the
//! [`horn_engine::authority::Authority`] that `hornd engine --manager` gives its
//! start, calling the manager's `BeginGeneration` and `RecordMembership`.
//!
//! A refusal the manager means (a newer generation has begun, the volume is gone, the
//! token is wrong) fences the engine; anything else (the manager restarting, a cut
//! link) is tried again by the engine for a while (`horn_engine::authority::PATIENCE`).

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use horn_engine::authority::{Authority, Grant, Refusal};
use horn_engine::membership::Record;
use horn_proto::manager_api as pb;
use tonic::Code;

use crate::api::{membership_from_wire, membership_to_wire};
use crate::ctl::{connect_with, Client};

/// How long one call to the manager may take.
const CALL: Duration = Duration::from_secs(5);

/// Volume `volume`'s membership, kept by the manager at `manager`, for an engine on
/// node `node`.
pub struct ManagerAuthority {
    manager: String,
    credentials: horn_pki::LiveCredentials,
    volume: String,
    node: String,
    runtime: tokio::runtime::Runtime,
    client: Mutex<Option<Client>>,
}

impl std::fmt::Debug for ManagerAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerAuthority")
            .field("manager", &self.manager)
            .field("volume", &self.volume)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ManagerAuthority {
    /// The authority for `volume` at `manager`, called with the node's credentials in
    /// `credentials` (a directory: `node.pem`, `node.key`, `ca.pem`).
    pub fn new(
        manager: &str,
        credentials: &std::path::Path,
        volume: &str,
        node: &str,
    ) -> Result<ManagerAuthority> {
        let credentials = horn_pki::LiveCredentials::open(credentials, crate::agent::NODE_CREDENTIALS)
            .with_context(|| format!("cannot read the node's credentials in {}", credentials.display()))?;
        Ok(ManagerAuthority {
            manager: manager.to_string(),
            credentials,
            volume: volume.to_string(),
            node: node.to_string(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            client: Mutex::new(None),
        })
    }

    /// Runs one call on a (re)connected client; a failed connection is dropped, so
    /// the next call connects again.
    fn call<T>(
        &self,
        f: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, tonic::Status>>>>,
    ) -> Result<T, Refusal> {
        let mut held = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let out = self.runtime.block_on(async {
            let client = match held.clone() {
                Some(c) => c,
                None => {
                    let c =
                        tokio::time::timeout(CALL, connect_with(&self.manager, &self.credentials.current()))
                            .await
                            .map_err(|_| {
                                Refusal::Unavailable(format!(
                                    "the manager at {} did not answer",
                                    self.manager
                                ))
                            })?
                            .map_err(|e| Refusal::Unavailable(format!("{e:#}")))?;
                    *held = Some(c.clone());
                    c
                }
            };
            match tokio::time::timeout(CALL, f(client)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(s)) => Err(refusal(&self.manager, s)),
                Err(_) => Err(Refusal::Unavailable(format!(
                    "the manager at {} did not answer within {CALL:?}",
                    self.manager
                ))),
            }
        });
        if matches!(out, Err(Refusal::Unavailable(_))) {
            *held = None;
        }
        out
    }
}

/// The manager's refusal: fenced when it means it, else worth another try.
fn refusal(manager: &str, s: tonic::Status) -> Refusal {
    let why = format!("the manager at {manager}: {}", s.message());
    match s.code() {
        Code::FailedPrecondition
        | Code::NotFound
        | Code::InvalidArgument
        | Code::Unauthenticated
        | Code::PermissionDenied => Refusal::Fenced(why),
        _ => Refusal::Unavailable(why),
    }
}

impl Authority for ManagerAuthority {
    fn begin(&self, generation: u64, engine: &str) -> Result<Grant, Refusal> {
        let request = pb::BeginGenerationRequest {
            volume: self.volume.clone(),
            at_least: generation,
            engine: engine.to_string(),
            node: self.node.clone(),
        };
        let reply = self.call(move |mut c| Box::pin(async move { c.begin_generation(request).await }))?;
        let reply = reply.into_inner();
        let key = (!reply.key.is_empty())
            .then(|| horn_proto::auth::GenerationKey::from_parts(reply.generation, &reply.key))
            .transpose()
            .map_err(|e| Refusal::Unavailable(format!("the manager's grant is malformed: {e}")))?;
        Ok(Grant {
            generation: reply.generation,
            record: reply.record.map(membership_from_wire),
            same_node: reply.same_node,
            name: reply.authority,
            key,
        })
    }

    fn put(&self, record: &Record) -> Result<(), Refusal> {
        let request = pb::RecordMembershipRequest {
            volume: self.volume.clone(),
            record: Some(membership_to_wire(record)),
            node: self.node.clone(),
        };
        self.call(move |mut c| Box::pin(async move { c.record_membership(request).await }))
            .map(|_| ())
    }
}
