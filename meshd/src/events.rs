//! Cluster events: what supervisors (local and remote) feed into merged views and caches.
//!
//! Every cluster's exported state arrives as one ordered stream per (cluster, kind):
//! `Init`, `Apply`…, `InitDone` after each (re)connection and list, then `Apply`/`Delete`
//! as it changes. A consumer keeps, per (cluster, kind), the entries applied since the
//! last `Init`; at `InitDone` it drops the ones that were not re-applied (wholesale
//! replace), so a reconnect to a peer never leaves ghosts even though each connection
//! uses a fresh reflector. `Drain` removes everything of a cluster (peer removed, or its
//! cache TTL expired while unreachable).

use crate::keys::{StateKey, StateKind, StateValue};
use crate::model::{ClusterConfig, ClusterName};

/// One change in one cluster's exported state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// The cluster's config (on connect, and when it changes).
    Config {
        /// The cluster.
        cluster: ClusterName,
        /// Its validated config.
        config: ClusterConfig,
    },
    /// A full list of `kind` starts.
    Init {
        /// The cluster.
        cluster: ClusterName,
        /// The kind being listed.
        kind: StateKind,
    },
    /// An entry is present (from a list) or changed (from the watch).
    Apply {
        /// The cluster.
        cluster: ClusterName,
        /// The entry's key (its kind is `key.kind()`).
        key: StateKey,
        /// The validated value.
        value: StateValue,
    },
    /// An entry is gone.
    Delete {
        /// The cluster.
        cluster: ClusterName,
        /// The entry's key.
        key: StateKey,
    },
    /// The list of `kind` is complete: entries not applied since `Init` are stale.
    InitDone {
        /// The cluster.
        cluster: ClusterName,
        /// The kind listed.
        kind: StateKind,
    },
    /// Everything of the cluster goes away.
    Drain {
        /// The cluster.
        cluster: ClusterName,
    },
}

impl ClusterEvent {
    /// The event of `cluster` that a reflector of `kind` reports as `ev`.
    pub fn from_reflector(
        cluster: ClusterName,
        kind: StateKind,
        ev: crate::reflector::Event<StateKey, StateValue>,
    ) -> Self {
        use crate::reflector::Event;
        match ev {
            Event::Init => Self::Init { cluster, kind },
            Event::InitApply(key, value) | Event::Apply(key, value) => Self::Apply {
                cluster,
                key,
                value,
            },
            Event::Delete(key) => Self::Delete { cluster, key },
            Event::InitDone => Self::InitDone { cluster, kind },
        }
    }

    /// The cluster the event is about.
    pub fn cluster(&self) -> &ClusterName {
        match self {
            Self::Config { cluster, .. }
            | Self::Init { cluster, .. }
            | Self::Apply { cluster, .. }
            | Self::Delete { cluster, .. }
            | Self::InitDone { cluster, .. }
            | Self::Drain { cluster } => cluster,
        }
    }
}
