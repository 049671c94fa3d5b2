//! etcd RBAC bootstrap: the users and roles of DESIGN §5, created idempotently.
//!
//! etcd runs with `--client-cert-auth`, so the CN of a client certificate is the etcd
//! user; nobody has a password. [`bootstrap`] makes one cluster's etcd match the design —
//! `root` and `admin-<cluster>` (role `root`), `apiserver-<cluster>` (role
//! [`APISERVER_ROLE`], read/write on `mesh/`), the roles [`APISERVER_ROLE`] and
//! [`REMOTE_ROLE`] with exactly their permissions, and auth on — and reports what it had to
//! change. It is safe to run on every start: on a fresh etcd, on one already bootstrapped,
//! with auth on or off. [`add_remote_user`] and [`revoke_remote_user`] manage the one user
//! per peer (`remote-<peer>`, read-only on what a peer needs), so one peer can be revoked
//! alone. Every call needs a client authenticated as `root` (e.g. a certificate with
//! CN `root`, or any client while auth is still off).
//!
//! etcd details relied on (verified against etcd 3.4.23 with etcd-client 0.21.1):
//! - a permission with an empty `range_end` is one exact key, so `mesh/heartbeat` does not
//!   grant `mesh/heartbeat2`, nor a prefix read or watch of `mesh/heartbeat`;
//! - a prefix permission has `range_end` = the prefix with its last byte incremented
//!   (what `Permission::with_prefix()` and [`meshd::keys::prefix_end`] both compute);
//! - granting a permission whose key and range end already exist replaces its type, and
//!   revoking removes every permission with that key and range end, whatever the type;
//! - `auth_enable` when auth is already on succeeds without telling, so whether auth is on
//!   is probed with an `Authenticate` call that cannot succeed (see [`auth_is_enabled`]);
//! - a deleted user's certificate still completes the TLS handshake, but every request
//!   (on new and on existing connections) is refused with `etcdserver: permission denied`,
//!   and a new watch is canceled with that reason. A watch opened *before* the deletion
//!   keeps delivering events: etcd checks watch permissions only when a watch is created.
//!   Revoking a peer therefore also needs its open watches ended (an etcd restart, or the
//!   peer's own disconnect); deleting the user alone does not cut a live stream.

use std::collections::BTreeMap;
use std::fmt;

use etcd_client::{
    Client, Permission, PermissionType, RoleRevokePermissionOptions, UserAddOptions,
};
use meshd::keys::{
    CLUSTER_CONFIG_PREFIX, HEARTBEAT, ROOT, STATE_PREFIX, SYNCED_PREFIX, prefix_end,
};
use meshd::model::ClusterName;

/// The role of a cluster's own apiserver: read/write on the prefix `mesh/`.
pub const APISERVER_ROLE: &str = "mesh-apiserver";
/// The role of every peer's user: read-only on `mesh/state/`, `mesh/cluster-config/`,
/// `mesh/synced/` (prefixes) and the single key `mesh/heartbeat`.
pub const REMOTE_ROLE: &str = "mesh-remote";
/// The role of the cluster's own agents: read-only on `mesh/` (they never write).
pub const AGENT_ROLE: &str = "mesh-agent";
/// etcd's superuser (must exist, with [`ROOT_ROLE`], before auth can be enabled).
pub const ROOT_USER: &str = "root";
/// etcd's built-in superuser role.
pub const ROOT_ROLE: &str = "root";
/// The user-name prefix of peer users.
pub const REMOTE_USER_PREFIX: &str = "remote-";

// The gRPC status messages of etcd (rpctypes), matched exactly.
const ROLE_EXISTS: &str = "etcdserver: role name already exists";
const USER_EXISTS: &str = "etcdserver: user name already exists";
const ROLE_NOT_FOUND: &str = "etcdserver: role name not found";
const USER_NOT_FOUND: &str = "etcdserver: user name not found";
const ROLE_NOT_GRANTED: &str = "etcdserver: role is not granted to the user";
const PERMISSION_NOT_GRANTED: &str = "etcdserver: permission is not granted to the role";
const AUTH_NOT_ENABLED: &str = "etcdserver: authentication is not enabled";
const AUTH_FAILED: &str = "etcdserver: authentication failed, invalid user ID or password";
// Not an rpctypes error: etcd 3.4.23 returns it with code Unknown.
const AUTH_NO_PASSWORD_USER: &str =
    "auth: authentication failed, password was given for no password user";
const AUTH_OLD_REVISION: &str = "etcdserver: revision of auth store is old";

/// The etcd user of `cluster`'s own apiserver: `apiserver-<cluster>`.
pub fn apiserver_user(cluster: &ClusterName) -> String {
    format!("apiserver-{cluster}")
}

/// The etcd user of `cluster`'s agents: `agent-<cluster>` (role [`AGENT_ROLE`]).
pub fn agent_user(cluster: &ClusterName) -> String {
    format!("agent-{cluster}")
}

/// The etcd administrator of `cluster`: `admin-<cluster>` (role `root`).
pub fn admin_user(cluster: &ClusterName) -> String {
    format!("admin-{cluster}")
}

/// The etcd user a peer cluster reads this cluster with: `remote-<peer>`.
pub fn remote_user(peer: &ClusterName) -> String {
    format!("{REMOTE_USER_PREFIX}{peer}")
}

/// The peer of a `remote-<peer>` user name ([`BootstrapError::InvalidName`] otherwise).
pub fn remote_peer(user: &str) -> Result<ClusterName, BootstrapError> {
    let invalid = |reason: &'static str| BootstrapError::InvalidName {
        name: user.to_owned(),
        reason,
    };
    let peer = user
        .strip_prefix(REMOTE_USER_PREFIX)
        .ok_or_else(|| invalid("does not start with \"remote-\""))?;
    ClusterName::new(peer).map_err(|_| invalid("the rest is not a cluster name"))
}

/// What a permission allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    /// Range and watch.
    Read,
    /// Put, delete (and the write half of transactions).
    Write,
    /// Both.
    ReadWrite,
    /// A type this client does not know (the raw protobuf value).
    Unknown(i32),
}

impl Access {
    fn from_raw(v: i32) -> Self {
        match PermissionType::try_from(v) {
            Ok(PermissionType::Read) => Self::Read,
            Ok(PermissionType::Write) => Self::Write,
            Ok(PermissionType::Readwrite) => Self::ReadWrite,
            Err(_) => Self::Unknown(v),
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read => f.write_str("read"),
            Self::Write => f.write_str("write"),
            Self::ReadWrite => f.write_str("readwrite"),
            Self::Unknown(v) => write!(f, "unknown({v})"),
        }
    }
}

/// One permission of a role, exactly as etcd stores it: an empty `range_end` is the single
/// key `key`, otherwise the range `[key, range_end)`.
///
/// (etcd-client's own `Permission` compares equal whenever the keys match and neither is a
/// prefix or from-key permission, ignoring `range_end`; this type does not.)
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyPermission {
    /// What is allowed.
    pub access: Access,
    /// The key, or the start of the range.
    pub key: Vec<u8>,
    /// The exclusive end of the range; empty for a single key.
    pub range_end: Vec<u8>,
}

impl KeyPermission {
    /// `access` on every key starting with `prefix`.
    pub fn prefix(access: Access, prefix: &str) -> Self {
        Self {
            access,
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
        }
    }

    /// `access` on the single key `key`.
    pub fn key(access: Access, key: &str) -> Self {
        Self {
            access,
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
        }
    }

    /// The permission as etcd reports it (`role_get`).
    pub fn from_etcd(p: &Permission) -> Self {
        Self {
            access: Access::from_raw(p.get_type()),
            key: p.key().to_vec(),
            range_end: p.range_end().to_vec(),
        }
    }

    /// The permission to grant; `None` for [`Access::Unknown`]. The range end is set
    /// explicitly, so etcd stores exactly `key` and `range_end`.
    pub fn to_etcd(&self) -> Option<Permission> {
        let t = match self.access {
            Access::Read => PermissionType::Read,
            Access::Write => PermissionType::Write,
            Access::ReadWrite => PermissionType::Readwrite,
            Access::Unknown(_) => return None,
        };
        Some(Permission::new(t, self.key.clone()).with_range_end(self.range_end.clone()))
    }

    fn range(&self) -> (Vec<u8>, Vec<u8>) {
        (self.key.clone(), self.range_end.clone())
    }
}

impl fmt::Display for KeyPermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = String::from_utf8_lossy(&self.key);
        if self.range_end.is_empty() {
            write!(f, "{} {key:?}", self.access)
        } else if self.range_end == prefix_end(&self.key) {
            write!(f, "{} prefix {key:?}", self.access)
        } else {
            let end = String::from_utf8_lossy(&self.range_end);
            write!(f, "{} [{key:?}, {end:?})", self.access)
        }
    }
}

/// The exact permissions of [`APISERVER_ROLE`].
pub fn apiserver_permissions() -> Vec<KeyPermission> {
    vec![KeyPermission::prefix(Access::ReadWrite, ROOT)]
}

/// The exact permissions of [`AGENT_ROLE`]: read everything under `mesh/`.
pub fn agent_permissions() -> Vec<KeyPermission> {
    vec![KeyPermission::prefix(Access::Read, ROOT)]
}

/// The exact permissions of [`REMOTE_ROLE`]: nothing of `mesh/cache/`, `mesh/policies/`,
/// `mesh/identity-*`, `mesh/clusterset-ips/`, and no write anywhere.
pub fn remote_permissions() -> Vec<KeyPermission> {
    vec![
        KeyPermission::prefix(Access::Read, STATE_PREFIX),
        KeyPermission::prefix(Access::Read, CLUSTER_CONFIG_PREFIX),
        KeyPermission::prefix(Access::Read, SYNCED_PREFIX),
        KeyPermission::key(Access::Read, HEARTBEAT),
    ]
}

/// One change [`bootstrap`] (or [`add_remote_user`]) made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A user was created (without password).
    UserAdded(String),
    /// A role was created.
    RoleAdded(String),
    /// A role was granted to a user.
    RoleGranted {
        /// The user.
        user: String,
        /// The role.
        role: String,
    },
    /// A role the user must not have was revoked.
    RoleRevoked {
        /// The user.
        user: String,
        /// The role.
        role: String,
    },
    /// A permission was granted to a role (or its type changed).
    PermissionGranted {
        /// The role.
        role: String,
        /// The permission.
        permission: KeyPermission,
    },
    /// A permission the role must not have was revoked.
    PermissionRevoked {
        /// The role.
        role: String,
        /// The permission.
        permission: KeyPermission,
    },
    /// Auth was off and was enabled.
    AuthEnabled,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UserAdded(u) => write!(f, "added user {u:?}"),
            Self::RoleAdded(r) => write!(f, "added role {r:?}"),
            Self::RoleGranted { user, role } => write!(f, "granted role {role:?} to {user:?}"),
            Self::RoleRevoked { user, role } => write!(f, "revoked role {role:?} from {user:?}"),
            Self::PermissionGranted { role, permission } => {
                write!(f, "granted {permission} to role {role:?}")
            }
            Self::PermissionRevoked { role, permission } => {
                write!(f, "revoked {permission} from role {role:?}")
            }
            Self::AuthEnabled => f.write_str("enabled auth"),
        }
    }
}

/// What [`bootstrap`] changed, in order. Empty when etcd already matched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootstrapReport {
    /// The changes made.
    pub changes: Vec<Change>,
}

impl BootstrapReport {
    /// Whether nothing had to change.
    pub fn is_unchanged(&self) -> bool {
        self.changes.is_empty()
    }

    fn push(&mut self, c: Change) {
        tracing::info!(change = %c, "etcd bootstrap");
        self.changes.push(c);
    }
}

/// A failed bootstrap step. Each variant names the step and keeps the etcd error.
///
/// Retryable ([`BootstrapError::is_retryable`]): any step whose etcd error is a transport
/// failure, `Unavailable`, `DeadlineExceeded`, `Aborted` or a stale auth revision — the
/// bootstrap is idempotent, so rerunning it from the start is always safe. Not retryable:
/// [`BootstrapError::InvalidName`], [`BootstrapError::RoleMismatch`], and etcd refusals such
/// as `etcdserver: permission denied` (the client is not `root`).
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Reading a role (`role_get`) failed.
    #[error("etcd bootstrap: reading role {role:?}: {source}")]
    GetRole {
        /// The role.
        role: String,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// Creating a role failed.
    #[error("etcd bootstrap: adding role {role:?}: {source}")]
    AddRole {
        /// The role.
        role: String,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// Granting a permission to a role failed.
    #[error("etcd bootstrap: granting {permission} to role {role:?}: {source}")]
    GrantPermission {
        /// The role.
        role: String,
        /// The permission.
        permission: KeyPermission,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// Revoking an extra permission from a role failed.
    #[error("etcd bootstrap: revoking {permission} from role {role:?}: {source}")]
    RevokePermission {
        /// The role.
        role: String,
        /// The permission.
        permission: KeyPermission,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// After reconciling, the role still does not have exactly the expected permissions.
    #[error("etcd bootstrap: role {role:?} has {found:?} after reconciling")]
    RoleMismatch {
        /// The role.
        role: String,
        /// What etcd reports.
        found: Vec<KeyPermission>,
    },
    /// Reading a user (`user_get`) failed.
    #[error("etcd bootstrap: reading user {user:?}: {source}")]
    GetUser {
        /// The user.
        user: String,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// Listing users failed.
    #[error("etcd bootstrap: listing users: {source}")]
    ListUsers {
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// Creating a user failed.
    #[error("etcd bootstrap: adding user {user:?}: {source}")]
    AddUser {
        /// The user.
        user: String,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// Granting a role to a user failed.
    #[error("etcd bootstrap: granting role {role:?} to user {user:?}: {source}")]
    GrantRole {
        /// The user.
        user: String,
        /// The role.
        role: String,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// Revoking an extra role from a user failed.
    #[error("etcd bootstrap: revoking role {role:?} from user {user:?}: {source}")]
    RevokeRole {
        /// The user.
        user: String,
        /// The role.
        role: String,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// Checking whether auth is on, or enabling it, failed.
    #[error("etcd bootstrap: enabling auth: {source}")]
    EnableAuth {
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// Deleting a user failed.
    #[error("etcd bootstrap: deleting user {user:?}: {source}")]
    DeleteUser {
        /// The user.
        user: String,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// A user name is not of the expected form.
    #[error("etcd bootstrap: invalid user name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
}

impl BootstrapError {
    /// The etcd error, if the step reached etcd.
    pub fn etcd_error(&self) -> Option<&etcd_client::Error> {
        match self {
            Self::GetRole { source, .. }
            | Self::AddRole { source, .. }
            | Self::GrantPermission { source, .. }
            | Self::RevokePermission { source, .. }
            | Self::GetUser { source, .. }
            | Self::ListUsers { source }
            | Self::AddUser { source, .. }
            | Self::GrantRole { source, .. }
            | Self::RevokeRole { source, .. }
            | Self::EnableAuth { source }
            | Self::DeleteUser { source, .. } => Some(source),
            Self::RoleMismatch { .. } | Self::InvalidName { .. } => None,
        }
    }

    /// Whether running the (idempotent) call again later can succeed.
    pub fn is_retryable(&self) -> bool {
        // gRPC codes (tonic::Code): DeadlineExceeded, Aborted, Unavailable.
        const RETRYABLE_CODES: [i32; 3] = [4, 10, 14];
        match self.etcd_error() {
            Some(etcd_client::Error::GRpcStatus(s)) => {
                RETRYABLE_CODES.contains(&(s.code() as i32)) || s.message() == AUTH_OLD_REVISION
            }
            Some(etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)) => true,
            _ => false,
        }
    }
}

/// Whether `e` is the etcd gRPC status with exactly this message.
fn is_status(e: &etcd_client::Error, message: &str) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message() == message)
}

/// Ensures `role` exists with exactly `want` (granting what is missing or of the wrong
/// type, then revoking every other key range), and checks the result.
async fn ensure_role(
    c: &mut Client,
    role: &str,
    want: &[KeyPermission],
    report: &mut BootstrapReport,
) -> Result<(), BootstrapError> {
    let get_err = |source| BootstrapError::GetRole {
        role: role.to_owned(),
        source,
    };
    let current = match c.role_get(role).await {
        Ok(r) => r.permissions(),
        Err(e) if is_status(&e, ROLE_NOT_FOUND) => {
            match c.role_add(role).await {
                Ok(_) => report.push(Change::RoleAdded(role.to_owned())),
                // Created concurrently: reconcile what is there.
                Err(e) if is_status(&e, ROLE_EXISTS) => {}
                Err(source) => {
                    return Err(BootstrapError::AddRole {
                        role: role.to_owned(),
                        source,
                    });
                }
            }
            c.role_get(role).await.map_err(get_err)?.permissions()
        }
        Err(source) => return Err(get_err(source)),
    };
    // Current permissions grouped by key range (etcd may hold several types for one range).
    let mut by_range: BTreeMap<(Vec<u8>, Vec<u8>), Vec<KeyPermission>> = BTreeMap::new();
    for p in current.iter().map(KeyPermission::from_etcd) {
        by_range.entry(p.range()).or_default().push(p);
    }

    for w in want {
        let have = by_range.remove(&w.range()).unwrap_or_default();
        if have.len() == 1 && have[0] == *w {
            continue;
        }
        if have.len() > 1 {
            // Several entries for one range: revoking removes them all, then grant once.
            revoke_range(c, role, &have[0]).await?;
            for p in have.iter().filter(|p| *p != w) {
                report.push(Change::PermissionRevoked {
                    role: role.to_owned(),
                    permission: p.clone(),
                });
            }
        } else if let Some(old) = have.first() {
            // One entry of the wrong type: granting the same range replaces the type.
            report.push(Change::PermissionRevoked {
                role: role.to_owned(),
                permission: old.clone(),
            });
        }
        let grant_err = |source| BootstrapError::GrantPermission {
            role: role.to_owned(),
            permission: w.clone(),
            source,
        };
        let Some(perm) = w.to_etcd() else {
            return Err(BootstrapError::RoleMismatch {
                role: role.to_owned(),
                found: vec![w.clone()],
            });
        };
        c.role_grant_permission(role, perm)
            .await
            .map_err(grant_err)?;
        report.push(Change::PermissionGranted {
            role: role.to_owned(),
            permission: w.clone(),
        });
    }
    // Whatever is left is not wanted at all.
    for extra in by_range.into_values() {
        if let Some(first) = extra.first() {
            revoke_range(c, role, first).await?;
        }
        for p in extra {
            report.push(Change::PermissionRevoked {
                role: role.to_owned(),
                permission: p,
            });
        }
    }

    let mut found: Vec<KeyPermission> = c
        .role_get(role)
        .await
        .map_err(get_err)?
        .permissions()
        .iter()
        .map(KeyPermission::from_etcd)
        .collect();
    found.sort();
    let mut want = want.to_vec();
    want.sort();
    if found != want {
        return Err(BootstrapError::RoleMismatch {
            role: role.to_owned(),
            found,
        });
    }
    Ok(())
}

/// Revokes every permission of `role` on exactly `p`'s key range.
async fn revoke_range(c: &mut Client, role: &str, p: &KeyPermission) -> Result<(), BootstrapError> {
    let opts = RoleRevokePermissionOptions::new().with_range_end(p.range_end.clone());
    match c
        .role_revoke_permission(role, p.key.clone(), Some(opts))
        .await
    {
        Ok(_) => Ok(()),
        // Revoked concurrently.
        Err(e) if is_status(&e, PERMISSION_NOT_GRANTED) => Ok(()),
        Err(source) => Err(BootstrapError::RevokePermission {
            role: role.to_owned(),
            permission: p.clone(),
            source,
        }),
    }
}

/// Ensures `user` exists (without password) and has `role`; with `exclusive`, revokes
/// every other role. Returns whether the user was created.
async fn ensure_user(
    c: &mut Client,
    user: &str,
    role: &str,
    exclusive: bool,
    report: &mut BootstrapReport,
) -> Result<bool, BootstrapError> {
    let get_err = |source| BootstrapError::GetUser {
        user: user.to_owned(),
        source,
    };
    let mut created = false;
    let roles: Vec<String> = match c.user_get(user).await {
        Ok(r) => r.roles().to_vec(),
        Err(e) if is_status(&e, USER_NOT_FOUND) => {
            match c
                .user_add(user, "", Some(UserAddOptions::new().with_no_pwd()))
                .await
            {
                Ok(_) => {
                    created = true;
                    report.push(Change::UserAdded(user.to_owned()));
                }
                // Created concurrently: reconcile what is there.
                Err(e) if is_status(&e, USER_EXISTS) => {}
                Err(source) => {
                    return Err(BootstrapError::AddUser {
                        user: user.to_owned(),
                        source,
                    });
                }
            }
            c.user_get(user).await.map_err(get_err)?.roles().to_vec()
        }
        Err(source) => return Err(get_err(source)),
    };
    if !roles.iter().any(|r| r == role) {
        c.user_grant_role(user, role)
            .await
            .map_err(|source| BootstrapError::GrantRole {
                user: user.to_owned(),
                role: role.to_owned(),
                source,
            })?;
        report.push(Change::RoleGranted {
            user: user.to_owned(),
            role: role.to_owned(),
        });
    }
    if exclusive {
        for other in roles.iter().filter(|r| *r != role) {
            match c.user_revoke_role(user, other.as_str()).await {
                Ok(_) => report.push(Change::RoleRevoked {
                    user: user.to_owned(),
                    role: other.clone(),
                }),
                Err(e) if is_status(&e, ROLE_NOT_GRANTED) => {}
                Err(source) => {
                    return Err(BootstrapError::RevokeRole {
                        user: user.to_owned(),
                        role: other.clone(),
                        source,
                    });
                }
            }
        }
    }
    Ok(created)
}

/// Whether auth is on. etcd 3.4 has no auth-status call (`AuthStatus` is 3.5+) and
/// `auth_enable` succeeds silently when auth is already on, so this asks to authenticate
/// `root` with an empty password, which can never succeed: "authentication is not enabled"
/// means off; "authentication failed" (root has a password) or "password was given for no
/// password user" (root has none, as [`bootstrap`] creates it) means on.
pub async fn auth_is_enabled(root: &Client) -> Result<bool, BootstrapError> {
    let mut auth = root.auth_client();
    match auth.authenticate(ROOT_USER.to_owned(), String::new()).await {
        Err(e) if is_status(&e, AUTH_NOT_ENABLED) => Ok(false),
        Err(e) if is_status(&e, AUTH_FAILED) || is_status(&e, AUTH_NO_PASSWORD_USER) => Ok(true),
        // Only possible if etcd accepted an empty password; auth is on either way.
        Ok(_) => Ok(true),
        Err(source) => Err(BootstrapError::EnableAuth { source }),
    }
}

/// Makes `cluster`'s etcd match DESIGN §5 and returns what had to change (nothing on a
/// second run). Idempotent: rerun it after any failure.
///
/// In order: `root` with role `root`; `admin-<cluster>` with role `root`; the roles
/// [`APISERVER_ROLE`] and [`REMOTE_ROLE`] with exactly [`apiserver_permissions`] and
/// [`remote_permissions`] (extra permissions are revoked); `apiserver-<cluster>` with
/// exactly [`APISERVER_ROLE`]; auth enabled if it was off. `root` must be a client that
/// etcd treats as `root` (or any client while auth is off).
pub async fn bootstrap(
    root: &Client,
    cluster: &ClusterName,
) -> Result<BootstrapReport, BootstrapError> {
    let mut c = root.clone();
    let mut report = BootstrapReport::default();
    ensure_user(&mut c, ROOT_USER, ROOT_ROLE, false, &mut report).await?;
    ensure_user(&mut c, &admin_user(cluster), ROOT_ROLE, false, &mut report).await?;
    ensure_role(
        &mut c,
        APISERVER_ROLE,
        &apiserver_permissions(),
        &mut report,
    )
    .await?;
    ensure_role(&mut c, REMOTE_ROLE, &remote_permissions(), &mut report).await?;
    ensure_role(&mut c, AGENT_ROLE, &agent_permissions(), &mut report).await?;
    ensure_user(
        &mut c,
        &apiserver_user(cluster),
        APISERVER_ROLE,
        true,
        &mut report,
    )
    .await?;
    ensure_user(&mut c, &agent_user(cluster), AGENT_ROLE, true, &mut report).await?;
    if !auth_is_enabled(&c).await? {
        c.auth_enable()
            .await
            .map_err(|source| BootstrapError::EnableAuth { source })?;
        report.push(Change::AuthEnabled);
    }
    Ok(report)
}

/// Ensures the user `remote-<peer>` exists (without password) with exactly
/// [`REMOTE_ROLE`], and that role with exactly [`remote_permissions`]. Returns whether the
/// user was created. Idempotent.
pub async fn add_remote_user(root: &Client, peer: &ClusterName) -> Result<bool, BootstrapError> {
    let mut c = root.clone();
    let mut report = BootstrapReport::default();
    ensure_role(&mut c, REMOTE_ROLE, &remote_permissions(), &mut report).await?;
    ensure_user(&mut c, &remote_user(peer), REMOTE_ROLE, true, &mut report).await
}

/// Deletes the user `remote-<peer>`; returns whether it existed. From then on etcd refuses
/// every request made with that user's certificate (`etcdserver: permission denied`), on
/// new and existing connections — except watches opened before, which etcd 3.4 keeps
/// serving (see the module docs).
pub async fn revoke_remote_user(root: &Client, peer: &ClusterName) -> Result<bool, BootstrapError> {
    let mut c = root.clone();
    let user = remote_user(peer);
    match c.user_delete(user.as_str()).await {
        Ok(_) => {
            tracing::info!(user, "etcd bootstrap: deleted peer user");
            Ok(true)
        }
        Err(e) if is_status(&e, USER_NOT_FOUND) => Ok(false),
        Err(source) => Err(BootstrapError::DeleteUser { user, source }),
    }
}

/// The `remote-<peer>` users (whose rest is a valid cluster name), sorted.
pub async fn list_remote_users(root: &Client) -> Result<Vec<String>, BootstrapError> {
    let mut c = root.clone();
    let resp = c
        .user_list()
        .await
        .map_err(|source| BootstrapError::ListUsers { source })?;
    let mut users: Vec<String> = resp
        .users()
        .iter()
        .filter(|u| remote_peer(u).is_ok())
        .cloned()
        .collect();
    users.sort();
    Ok(users)
}
