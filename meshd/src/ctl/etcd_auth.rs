//! The etcd RBAC bootstrap `meshctl up` needs (DESIGN §5), on a fresh etcd.
//!
//! This replicates the few auth calls of `clustermesh_apiserver::bootstrap` (meshd cannot
//! depend on the apiserver crate, which depends on meshd). It expects a fresh etcd with
//! auth still off and is not a general reconciler: `meshctl up` always starts from a new
//! data directory.

use etcd_client::{Client, Permission, UserAddOptions};

use crate::keys::{CLUSTER_CONFIG_PREFIX, HEARTBEAT, ROOT, STATE_PREFIX, SYNCED_PREFIX};

/// Role of a cluster's own apiserver: read/write on `mesh/` (same name as the apiserver's).
pub(crate) const APISERVER_ROLE: &str = "mesh-apiserver";
/// Role of peers: read on `mesh/state/`, `mesh/cluster-config/`, `mesh/synced/` and the key
/// `mesh/heartbeat` (same name and permissions as the apiserver's bootstrap).
pub(crate) const REMOTE_ROLE: &str = "mesh-remote";
/// Role of the local agent: read-only on `mesh/` (the agent never writes).
pub(crate) const AGENT_ROLE: &str = "mesh-agent";

/// The etcd user of `cluster`'s apiserver.
pub(crate) fn apiserver_user(cluster: &str) -> String {
    format!("apiserver-{cluster}")
}

/// The etcd user of `cluster`'s agent (read-only).
pub(crate) fn agent_user(cluster: &str) -> String {
    format!("agent-{cluster}")
}

/// The etcd user a peer reads this cluster with.
pub(crate) fn remote_user(peer: &str) -> String {
    format!("remote-{peer}")
}

fn ctx(what: String) -> impl FnOnce(etcd_client::Error) -> String {
    move |e| format!("etcd bootstrap: {what}: {e}")
}

async fn add_user(c: &mut Client, user: &str, role: &str) -> Result<(), String> {
    c.user_add(user, "", Some(UserAddOptions::new().with_no_pwd()))
        .await
        .map_err(ctx(format!("adding user {user:?}")))?;
    c.user_grant_role(user, role)
        .await
        .map_err(ctx(format!("granting role {role:?} to {user:?}")))?;
    Ok(())
}

async fn add_role(c: &mut Client, role: &str, perms: Vec<Permission>) -> Result<(), String> {
    c.role_add(role)
        .await
        .map_err(ctx(format!("adding role {role:?}")))?;
    for p in perms {
        c.role_grant_permission(role, p)
            .await
            .map_err(ctx(format!("granting a permission to role {role:?}")))?;
    }
    Ok(())
}

/// On a fresh etcd (auth off): `root` (role root), the apiserver, agent and remote roles,
/// `apiserver-<cluster>`, `agent-<cluster>`; then enables auth.
pub(crate) async fn bootstrap(root: &Client, cluster: &str) -> Result<(), String> {
    let mut c = root.clone();
    add_user(&mut c, "root", "root").await?;
    add_role(
        &mut c,
        APISERVER_ROLE,
        vec![Permission::read_write(ROOT).with_prefix()],
    )
    .await?;
    add_role(
        &mut c,
        AGENT_ROLE,
        vec![Permission::read(ROOT).with_prefix()],
    )
    .await?;
    add_role(
        &mut c,
        REMOTE_ROLE,
        vec![
            Permission::read(STATE_PREFIX).with_prefix(),
            Permission::read(CLUSTER_CONFIG_PREFIX).with_prefix(),
            Permission::read(SYNCED_PREFIX).with_prefix(),
            Permission::read(HEARTBEAT),
        ],
    )
    .await?;
    add_user(&mut c, &apiserver_user(cluster), APISERVER_ROLE).await?;
    add_user(&mut c, &agent_user(cluster), AGENT_ROLE).await?;
    c.auth_enable().await.map_err(ctx("enabling auth".into()))?;
    Ok(())
}

/// Creates `remote-<peer>` with [`REMOTE_ROLE`] (needs a root client).
pub(crate) async fn add_remote_user(root: &Client, peer: &str) -> Result<(), String> {
    let mut c = root.clone();
    add_user(&mut c, &remote_user(peer), REMOTE_ROLE).await
}
