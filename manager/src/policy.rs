//! Who may call what: the policies of the cluster's gRPC services, in one place.
//!
//! Every service of a cluster serves mutual TLS with certificates from the cluster's
//! CA ([`horn_pki`]), and checks each call against the caller's role here before the
//! call is served ([`horn_pki::Guarded`]):
//! - [`manager`]: the manager's API;
//! - [`replica`]: a replica's control service;
//! - [`engine`]: an engine's control service.
//!
//! Beyond the role, a replica takes changes only from the holder of the current
//! generation's key of its volume (`horn_proto::auth`), and the manager takes a
//! node's calls for that node only (`api::acting_for`).

use horn_pki::{refuse, Policy, Role};

/// Calls a read-only certificate may make: they list and read, and reveal no secret.
const READ_CALLS: &[&str] = &[
    "ClusterInfo",
    "GetVolume",
    "ListVolumes",
    "GetNode",
    "ListNodes",
    "ListSnapshots",
    "GetSettings",
    "ListSecrets",
    "ListBackupTargets",
    "ListJobs",
    "JobHistory",
];

/// Calls a node's certificate may make, each for its own node only
/// ([`acting_for`]): its agent's and its engines' calls.
const NODE_CALLS: &[&str] = &[
    "ClusterInfo",
    "RegisterNode",
    "NodeHeartbeat",
    "SyncNode",
    "BeginGeneration",
    "RecordMembership",
];

/// Who may call what on the manager: a node joins without a certificate (it proves
/// the cluster token instead); the admin makes every call; a read-only certificate
/// the calls of [`READ_CALLS`]; a node's the calls of [`NODE_CALLS`]; nothing else
/// is taken.
pub fn manager() -> horn_pki::Policy {
    std::sync::Arc::new(|path: &str, role: Option<&horn_pki::Role>| {
        let method = path.rsplit('/').next().unwrap_or_default();
        match role {
            _ if method == "JoinNode" => Ok(()),
            // Every holder renews its own certificate (for the role it has).
            Some(_) if method == "RenewCredentials" => Ok(()),
            Some(Role::Admin) => Ok(()),
            Some(Role::ReadOnly) if READ_CALLS.contains(&method) => Ok(()),
            Some(Role::Node(_)) if NODE_CALLS.contains(&method) => Ok(()),
            _ => {
                let needs = if READ_CALLS.contains(&method) {
                    "the admin, read-only or node role"
                } else if NODE_CALLS.contains(&method) {
                    "the admin or a node role"
                } else {
                    "the admin role"
                };
                Err(horn_pki::refuse(path, role, needs))
            }
        }
    })
}

/// A replica's control service: the admin, and any node's certificate (an engine
/// runs on any node, and a replica being rebuilt pulls from others), make every
/// call; a read-only certificate only `Info`.
pub fn replica() -> Policy {
    std::sync::Arc::new(|path: &str, role: Option<&Role>| {
        let method = path.rsplit('/').next().unwrap_or_default();
        match role {
            Some(Role::Admin | Role::Node(_)) => Ok(()),
            Some(Role::ReadOnly) if method == "Info" => Ok(()),
            _ => Err(refuse(
                path,
                role,
                if method == "Info" {
                    "the admin, a node or the read-only role"
                } else {
                    "the admin or a node role"
                },
            )),
        }
    })
}

/// Engine calls a read-only certificate may make.
const ENGINE_READ_CALLS: &[&str] = &["Info", "ListSnapshots"];

/// An engine's control service on node `node` (`None`: the engine knows no node):
/// the admin and the manager make every call, as does the certificate of the
/// engine's own node (its agent); a read-only certificate reads.
pub fn engine(node: Option<String>) -> Policy {
    std::sync::Arc::new(move |path: &str, role: Option<&Role>| {
        let method = path.rsplit('/').next().unwrap_or_default();
        match role {
            Some(Role::Admin | Role::Manager) => Ok(()),
            Some(Role::Node(n)) if node.as_deref() == Some(n.as_str()) => Ok(()),
            Some(Role::ReadOnly) if ENGINE_READ_CALLS.contains(&method) => Ok(()),
            _ => Err(refuse(
                path,
                role,
                &match &node {
                    Some(n) => format!("the admin, the manager or node {n}'s role"),
                    None => "the admin or the manager role".to_string(),
                },
            )),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(p: &Policy, path: &str, role: Option<Role>) -> bool {
        p(path, role.as_ref()).is_ok()
    }

    #[test]
    fn each_role_gets_its_calls_and_no_more() {
        let n = |s: &str| Some(Role::Node(s.into()));
        let m = manager();
        assert!(allowed(&m, "/horn.manager.v1.Manager/JoinNode", None));
        assert!(!allowed(&m, "/horn.manager.v1.Manager/ListVolumes", None));
        assert!(allowed(
            &m,
            "/horn.manager.v1.Manager/ListVolumes",
            Some(Role::ReadOnly)
        ));
        assert!(!allowed(
            &m,
            "/horn.manager.v1.Manager/GetVolumeCredentials",
            Some(Role::ReadOnly)
        ));
        assert!(allowed(&m, "/horn.manager.v1.Manager/SyncNode", n("n1")));
        assert!(!allowed(&m, "/horn.manager.v1.Manager/CreateVolume", n("n1")));
        assert!(!allowed(
            &m,
            "/horn.manager.v1.Manager/CreateVolume",
            Some(Role::Manager)
        ));
        assert!(allowed(
            &m,
            "/horn.manager.v1.Manager/NoSuchCall",
            Some(Role::Admin)
        ));
        let r = replica();
        assert!(allowed(&r, "/horn.replica.v1.ReplicaControl/Claim", n("n2")));
        assert!(allowed(
            &r,
            "/horn.replica.v1.ReplicaControl/Info",
            Some(Role::ReadOnly)
        ));
        assert!(!allowed(
            &r,
            "/horn.replica.v1.ReplicaControl/ReadBlocks",
            Some(Role::ReadOnly)
        ));
        assert!(!allowed(
            &r,
            "/horn.replica.v1.ReplicaControl/Claim",
            Some(Role::Manager)
        ));
        assert!(!allowed(&r, "/horn.replica.v1.ReplicaControl/Info", None));
        let e = engine(Some("n1".into()));
        assert!(allowed(&e, "/horn.engine.v1.EngineControl/Revert", n("n1")));
        assert!(!allowed(&e, "/horn.engine.v1.EngineControl/Revert", n("n2")));
        assert!(allowed(
            &e,
            "/horn.engine.v1.EngineControl/Snapshot",
            Some(Role::Manager)
        ));
        assert!(allowed(
            &e,
            "/horn.engine.v1.EngineControl/Info",
            Some(Role::ReadOnly)
        ));
        assert!(!allowed(
            &e,
            "/horn.engine.v1.EngineControl/DropReplica",
            Some(Role::ReadOnly)
        ));
        assert!(!allowed(&e, "/horn.engine.v1.EngineControl/Info", None));
    }
}
