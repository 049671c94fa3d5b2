//! The from-scratch computation the incremental engine must equal (tests, benchmark baseline).
//!
//! Deliberately naive: every endpoint × every policy × every rule × every identity, with
//! plain selector matching and no cache, so it shares only the compile step (scoping,
//! entities, port expansion) with the engine.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{ClusterName, Identity, Labels, MeshNetworkPolicy, ReservedIdentity};

use super::compile::{PeerSpec, compile};
use super::{Direction, EndpointId, Peer, PolicyDiff, PolicyEntry, reserved_labels};

/// Every endpoint's entries and default-deny flags (endpoints enforcing nothing omitted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// All entries.
    pub entries: BTreeSet<PolicyEntry>,
    /// `(ingress, egress)` default-deny flags of endpoints with at least one set.
    pub enforcement: BTreeMap<EndpointId, (bool, bool)>,
}

impl PolicyState {
    /// Applies diffs as a datapath would, failing on an inconsistent one (allowing an entry
    /// twice, revoking a missing one).
    pub fn apply(&mut self, diffs: &[PolicyDiff]) -> Result<(), String> {
        for d in diffs {
            match d {
                PolicyDiff::Allow(e) => {
                    if !self.entries.insert(*e) {
                        return Err(format!("allowed twice: {e:?}"));
                    }
                }
                PolicyDiff::Revoke(e) => {
                    if !self.entries.remove(e) {
                        return Err(format!("revoked but absent: {e:?}"));
                    }
                }
                PolicyDiff::Enforcement {
                    endpoint,
                    ingress,
                    egress,
                } => {
                    if *ingress || *egress {
                        self.enforcement.insert(*endpoint, (*ingress, *egress));
                    } else {
                        self.enforcement.remove(endpoint);
                    }
                }
            }
        }
        Ok(())
    }

    /// Forgets a removed endpoint's flags (the datapath deletes the endpoint itself).
    pub fn forget_endpoint(&mut self, endpoint: EndpointId) {
        self.enforcement.remove(&endpoint);
    }
}

/// Computes the state from scratch. `policies` are the versions in force (valid ones);
/// reserved identities are added like the engine seeds them.
pub fn compute(
    local: &ClusterName,
    identities: &BTreeMap<Identity, Labels>,
    policies: &[MeshNetworkPolicy],
    endpoints: &BTreeMap<EndpointId, Identity>,
) -> PolicyState {
    let mut all: Vec<(Identity, Labels)> = ReservedIdentity::ALL
        .into_iter()
        .map(|r| (r.identity(), reserved_labels(r)))
        .collect();
    all.extend(identities.iter().map(|(i, l)| (*i, l.clone())));
    let compiled: Vec<_> = policies.iter().map(|p| compile(p, local)).collect();
    let mut st = PolicyState::default();
    for (ep, id) in endpoints {
        let Some(labels) = identities.get(id) else {
            continue;
        };
        let mut flags = [false, false];
        for spec in &compiled {
            if !spec.subject.matches(labels) {
                continue;
            }
            for (d, rules) in spec.dirs.iter().enumerate() {
                let Some(rules) = rules else { continue };
                flags[d] = true;
                let direction = Direction::BOTH[d];
                for r in rules {
                    for (peer, _) in &r.peers {
                        let peers: Vec<Peer> = match peer {
                            PeerSpec::Any => vec![Peer::Any],
                            PeerSpec::Selector(s) => all
                                .iter()
                                .filter(|(_, l)| s.matches(l))
                                .map(|(i, _)| Peer::Identity(*i))
                                .collect(),
                        };
                        for p in peers {
                            for &(port, proto) in &r.ports {
                                st.entries.insert(PolicyEntry {
                                    endpoint: *ep,
                                    peer: p,
                                    port,
                                    proto,
                                    direction,
                                });
                            }
                        }
                    }
                }
            }
        }
        if flags != [false, false] {
            st.enforcement.insert(*ep, (flags[0], flags[1]));
        }
    }
    st
}
