//! The incremental engine: policies, identities and local endpoints in; net diffs out.
//!
//! State per active local identity (one with at least one endpoint here): refcounted
//! entries and per-direction counts of selecting policies. Every input event touches only
//! what depends on it: an identity event visits the selectors that match it (from the
//! cache's index) and, through their users, the rules and subjects concerned; a policy
//! event visits its own selectors' matches; an endpoint event its identity's entries.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::model::{
    ClusterName, Identity, Labels, MeshNetworkPolicy, PolicyValidationError, ReservedIdentity,
};

use super::cache::{PolicyIdx, SelectorCache, SelectorId, User};
use super::compile::{PeerOrigin, PeerSpec, compile};
use super::reference::PolicyState;
use super::{
    Direction, EndpointId, PolicyDiff, PolicyEntry, PolicyError, PolicyRef, pack, reserved_labels,
    unpack,
};

/// A compiled peer, registered with the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PeerRef {
    Any,
    Selector(SelectorId),
}

#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) peers: Vec<(PeerRef, PeerOrigin)>,
    pub(crate) ports: Vec<(u16, u8)>,
}

#[derive(Debug)]
pub(crate) struct Compiled {
    pub(crate) key: PolicyRef,
    pub(crate) policy: MeshNetworkPolicy,
    pub(crate) subject: SelectorId,
    pub(crate) dirs: [Option<Vec<Rule>>; 2],
    /// Active local identities this policy selects.
    subjects: HashSet<Identity>,
}

/// A local identity with endpoints on this node.
#[derive(Debug, Default)]
struct Subject {
    endpoints: Vec<EndpointId>,
    /// Packed entry → number of (policy, rule, peer) contributions.
    entries: HashMap<u64, u32>,
    /// Selecting policies with rules, per direction.
    enforce: [u32; 2],
    /// Policies selecting this identity.
    policies: Vec<PolicyIdx>,
}

impl Subject {
    fn flags(&self) -> (bool, bool) {
        (self.enforce[0] > 0, self.enforce[1] > 0)
    }
}

/// Entry state and the not yet emitted net changes.
#[derive(Debug, Default)]
struct Output {
    subjects: HashMap<Identity, Subject>,
    endpoints: HashMap<EndpointId, Identity>,
    /// (subject, packed entry) → added (true) or removed (false) since the last settle.
    pending: HashMap<(Identity, u64), bool>,
    /// Subject → flags at the last settle.
    pending_enforce: HashMap<Identity, (bool, bool)>,
    out: Vec<PolicyDiff>,
}

fn dir_of(d: usize) -> Direction {
    Direction::BOTH[d]
}

impl Output {
    fn apply(&mut self, l: Identity, peer: u32, ports: &[(u16, u8)], d: usize, add: bool) {
        let Some(subj) = self.subjects.get_mut(&l) else {
            debug_assert!(false, "entries only for active subjects");
            return;
        };
        for &(port, proto) in ports {
            let key = pack(peer, port, proto, dir_of(d));
            let changed = if add {
                let c = subj.entries.entry(key).or_insert(0);
                *c += 1;
                *c == 1
            } else {
                match subj.entries.entry(key) {
                    Entry::Occupied(mut e) => {
                        *e.get_mut() -= 1;
                        if *e.get() == 0 {
                            e.remove();
                            true
                        } else {
                            false
                        }
                    }
                    Entry::Vacant(_) => {
                        debug_assert!(false, "removing an entry that is not there");
                        false
                    }
                }
            };
            if changed {
                match self.pending.entry((l, key)) {
                    Entry::Occupied(e) => {
                        debug_assert_ne!(*e.get(), add);
                        e.remove();
                    }
                    Entry::Vacant(v) => {
                        v.insert(add);
                    }
                }
            }
        }
    }

    fn enforce(&mut self, l: Identity, d: usize, add: bool) {
        let Some(subj) = self.subjects.get_mut(&l) else {
            return;
        };
        self.pending_enforce.entry(l).or_insert(subj.flags());
        if add {
            subj.enforce[d] += 1;
        } else {
            subj.enforce[d] -= 1;
        }
    }

    /// Turns pending changes into diffs, fanned out to each endpoint of the subject.
    fn settle(&mut self) {
        for ((l, key), added) in self.pending.drain() {
            if let Some(s) = self.subjects.get(&l) {
                for ep in &s.endpoints {
                    let e = unpack(*ep, key);
                    self.out.push(if added {
                        PolicyDiff::Allow(e)
                    } else {
                        PolicyDiff::Revoke(e)
                    });
                }
            }
        }
        for (l, old) in self.pending_enforce.drain() {
            if let Some(s) = self.subjects.get(&l) {
                let (ingress, egress) = s.flags();
                if (ingress, egress) != old {
                    for ep in &s.endpoints {
                        self.out.push(PolicyDiff::Enforcement {
                            endpoint: *ep,
                            ingress,
                            egress,
                        });
                    }
                }
            }
        }
    }
}

/// Adds (or removes) everything policy `p` contributes to subject `l`.
fn activate(
    cache: &SelectorCache,
    policies: &mut [Option<Compiled>],
    out: &mut Output,
    p: PolicyIdx,
    l: Identity,
    add: bool,
) {
    let Some(pol) = policies[p as usize].as_mut() else {
        return;
    };
    let Some(subj) = out.subjects.get_mut(&l) else {
        return;
    };
    if add {
        if !pol.subjects.insert(l) {
            return;
        }
        subj.policies.push(p);
    } else {
        if !pol.subjects.remove(&l) {
            return;
        }
        if let Some(pos) = subj.policies.iter().position(|x| *x == p) {
            subj.policies.swap_remove(pos);
        }
    }
    for (d, rules) in pol.dirs.iter().enumerate() {
        let Some(rules) = rules else { continue };
        out.enforce(l, d, add);
        for r in rules {
            for (peer, _) in &r.peers {
                match peer {
                    PeerRef::Any => out.apply(l, 0, &r.ports, d, add),
                    PeerRef::Selector(s) => {
                        for x in &cache.entry(*s).matches {
                            out.apply(l, x.get(), &r.ports, d, add);
                        }
                    }
                }
            }
        }
    }
}

/// Counts, for status and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Identities known (reserved ones included).
    pub identities: usize,
    /// Distinct selectors in the cache.
    pub selectors: usize,
    /// Policies in force.
    pub policies: usize,
    /// Policies whose latest version was rejected.
    pub rejected: usize,
    /// Local endpoints registered.
    pub endpoints: usize,
    /// Local identities with endpoints.
    pub subjects: usize,
    /// Entries over all endpoints.
    pub entries: usize,
}

/// The policy engine of one cluster (see the [module docs](super)).
#[derive(Debug)]
pub struct PolicyEngine {
    local: ClusterName,
    cache: SelectorCache,
    policies: Vec<Option<Compiled>>,
    free: Vec<PolicyIdx>,
    by_ref: BTreeMap<PolicyRef, PolicyIdx>,
    rejected: BTreeMap<PolicyRef, PolicyValidationError>,
    out: Output,
    scratch: Vec<SelectorId>,
}

impl PolicyEngine {
    /// An engine for the policies of cluster `local`, knowing only the reserved identities.
    pub fn new(local: ClusterName) -> Self {
        let mut e = Self {
            local,
            cache: SelectorCache::default(),
            policies: Vec::new(),
            free: Vec::new(),
            by_ref: BTreeMap::new(),
            rejected: BTreeMap::new(),
            out: Output::default(),
            scratch: Vec::new(),
        };
        for r in ReservedIdentity::ALL {
            e.insert_identity(r.identity(), reserved_labels(r));
        }
        e
    }

    /// The cluster whose policies and endpoints this engine computes.
    pub fn local_cluster(&self) -> &ClusterName {
        &self.local
    }

    // ---- identities ----

    /// Adds an identity (local or remote) or changes its labels.
    pub fn upsert_identity(&mut self, id: Identity, labels: Labels) -> Result<(), PolicyError> {
        if id.is_reserved() {
            return Err(PolicyError::ReservedIdentity(id));
        }
        if let Some(st) = self.cache.identities.get(&id) {
            if st.labels == labels {
                return Ok(());
            }
            self.remove_identity(id);
        }
        self.insert_identity(id, labels);
        Ok(())
    }

    fn insert_identity(&mut self, id: Identity, labels: Labels) {
        let mut matched = std::mem::take(&mut self.scratch);
        self.cache.matching(&labels, &mut matched);
        // 1. As a peer: every current subject of the rules whose selectors match it.
        for &s in &matched {
            for u in &self.cache.entry(s).users {
                if let User::Peer { policy, dir, rule } = *u {
                    let pol = self.policies[policy as usize]
                        .as_ref()
                        .expect("users name live policies");
                    let d = usize::from(dir);
                    let r = &pol.dirs[d].as_ref().expect("rules of a user")[rule as usize];
                    for &l in &pol.subjects {
                        self.out.apply(l, id.get(), &r.ports, d, true);
                    }
                }
            }
        }
        // 2. Into the selectors' match sets.
        self.cache.insert_identity(id, labels, &matched);
        // 3. As a subject (if it has endpoints here): everything its policies allow,
        //    itself included now that the match sets hold it.
        if self.out.subjects.contains_key(&id) {
            for &s in &matched {
                for u in &self.cache.entry(s).users {
                    if let User::Subject(p) = *u {
                        activate(&self.cache, &mut self.policies, &mut self.out, p, id, true);
                    }
                }
            }
        }
        self.scratch = matched;
    }

    /// Removes an identity; false if it was unknown (or reserved).
    pub fn remove_identity(&mut self, id: Identity) -> bool {
        if id.is_reserved() {
            return false;
        }
        let Some(st) = self.cache.identities.get(&id) else {
            return false;
        };
        let mut matched = std::mem::take(&mut self.scratch);
        matched.clear();
        matched.extend_from_slice(&st.matched);
        // 1. As a subject, while the match sets still hold it (its entries to itself).
        if self.out.subjects.contains_key(&id) {
            for &s in &matched {
                for u in &self.cache.entry(s).users {
                    if let User::Subject(p) = *u {
                        activate(&self.cache, &mut self.policies, &mut self.out, p, id, false);
                    }
                }
            }
        }
        // 2. Out of the match sets.
        self.cache.remove_identity(id);
        // 3. As a peer of the remaining subjects.
        for &s in &matched {
            for u in &self.cache.entry(s).users {
                if let User::Peer { policy, dir, rule } = *u {
                    let pol = self.policies[policy as usize]
                        .as_ref()
                        .expect("users name live policies");
                    let d = usize::from(dir);
                    let r = &pol.dirs[d].as_ref().expect("rules of a user")[rule as usize];
                    for &l in &pol.subjects {
                        self.out.apply(l, id.get(), &r.ports, d, false);
                    }
                }
            }
        }
        self.scratch = matched;
        true
    }

    /// Makes the identity table equal to `identities` (after a relist or from a merged-view
    /// snapshot): removes the missing ones, upserts the rest. Reserved ones are skipped.
    pub fn sync_identities<'a>(
        &mut self,
        identities: impl IntoIterator<Item = (Identity, &'a Labels)>,
    ) {
        let want: HashMap<Identity, &Labels> = identities
            .into_iter()
            .filter(|(i, _)| !i.is_reserved())
            .collect();
        let gone: Vec<Identity> = self
            .cache
            .identities
            .keys()
            .filter(|i| !i.is_reserved() && !want.contains_key(i))
            .copied()
            .collect();
        for i in gone {
            self.remove_identity(i);
        }
        for (i, labels) in want {
            if self
                .cache
                .identities
                .get(&i)
                .is_none_or(|st| st.labels != *labels)
            {
                let _ = self.upsert_identity(i, labels.clone());
            }
        }
    }

    /// The labels of a known identity.
    pub fn identity_labels(&self, id: Identity) -> Option<&Labels> {
        self.cache.identities.get(&id).map(|s| &s.labels)
    }

    /// Every known identity with its labels (reserved ones included).
    pub fn identities(&self) -> impl Iterator<Item = (Identity, &Labels)> + '_ {
        self.cache.identities.iter().map(|(i, s)| (*i, &s.labels))
    }

    // ---- policies ----

    /// Adds or replaces a policy. An invalid one is rejected as a whole (recorded in
    /// [`Self::rejected`]) and the previous valid version, if any, stays in force.
    pub fn upsert_policy(&mut self, policy: MeshNetworkPolicy) -> Result<(), PolicyError> {
        let key = PolicyRef::new(policy.namespace.clone(), policy.name.clone());
        if let Err(e) = policy.validate() {
            self.rejected.insert(key, e.clone());
            return Err(e.into());
        }
        self.rejected.remove(&key);
        if let Some(&idx) = self.by_ref.get(&key) {
            if self.policies[idx as usize]
                .as_ref()
                .is_some_and(|c| c.policy == policy)
            {
                return Ok(());
            }
            self.remove_policy_idx(idx);
        }
        let spec = compile(&policy, &self.local);
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.policies.push(None);
                (self.policies.len() - 1) as PolicyIdx
            }
        };
        let subject = self.cache.acquire(spec.subject, User::Subject(idx));
        let mut dirs: [Option<Vec<Rule>>; 2] = [None, None];
        for (d, rules) in spec.dirs.into_iter().enumerate() {
            let Some(rules) = rules else { continue };
            let mut compiled = Vec::with_capacity(rules.len());
            for (ri, r) in rules.into_iter().enumerate() {
                let user = User::Peer {
                    policy: idx,
                    dir: d as u8,
                    rule: ri as u32,
                };
                let peers = r
                    .peers
                    .into_iter()
                    .map(|(p, origin)| {
                        let p = match p {
                            PeerSpec::Any => PeerRef::Any,
                            PeerSpec::Selector(s) => PeerRef::Selector(self.cache.acquire(s, user)),
                        };
                        (p, origin)
                    })
                    .collect();
                compiled.push(Rule {
                    peers,
                    ports: r.ports,
                });
            }
            dirs[d] = Some(compiled);
        }
        self.policies[idx as usize] = Some(Compiled {
            key: key.clone(),
            policy,
            subject,
            dirs,
            subjects: HashSet::new(),
        });
        self.by_ref.insert(key, idx);
        for l in &self.cache.entry(subject).matches {
            if self.out.subjects.contains_key(l) {
                activate(
                    &self.cache,
                    &mut self.policies,
                    &mut self.out,
                    idx,
                    *l,
                    true,
                );
            }
        }
        Ok(())
    }

    /// Removes a policy (and forgets a rejection of it); false if it was not in force.
    pub fn remove_policy(&mut self, key: &PolicyRef) -> bool {
        self.rejected.remove(key);
        match self.by_ref.get(key) {
            Some(&idx) => {
                self.remove_policy_idx(idx);
                true
            }
            None => false,
        }
    }

    fn remove_policy_idx(&mut self, idx: PolicyIdx) {
        let subjects: Vec<Identity> = self.policies[idx as usize]
            .as_ref()
            .map(|c| c.subjects.iter().copied().collect())
            .unwrap_or_default();
        for l in subjects {
            activate(
                &self.cache,
                &mut self.policies,
                &mut self.out,
                idx,
                l,
                false,
            );
        }
        let Some(pol) = self.policies[idx as usize].take() else {
            return;
        };
        self.cache.release(pol.subject, User::Subject(idx));
        for (d, rules) in pol.dirs.iter().enumerate() {
            for (ri, r) in rules.iter().flatten().enumerate() {
                for (p, _) in &r.peers {
                    if let PeerRef::Selector(s) = p {
                        self.cache.release(
                            *s,
                            User::Peer {
                                policy: idx,
                                dir: d as u8,
                                rule: ri as u32,
                            },
                        );
                    }
                }
            }
        }
        self.by_ref.remove(&pol.key);
        self.free.push(idx);
    }

    /// Policies in force, by namespace/name.
    pub fn policies(&self) -> impl Iterator<Item = &MeshNetworkPolicy> + '_ {
        self.by_ref
            .values()
            .filter_map(|i| self.policies[*i as usize].as_ref().map(|c| &c.policy))
    }

    /// Policies whose latest version was rejected, and why (the previous valid version, if
    /// any, is still in force).
    pub fn rejected(&self) -> &BTreeMap<PolicyRef, PolicyValidationError> {
        &self.rejected
    }

    pub(crate) fn compiled(&self) -> impl Iterator<Item = &Compiled> + '_ {
        self.by_ref
            .values()
            .filter_map(|i| self.policies[*i as usize].as_ref())
    }

    pub(crate) fn cache(&self) -> &SelectorCache {
        &self.cache
    }

    // ---- endpoints ----

    /// Registers a local endpoint (or moves it to another identity). Its entries follow
    /// as diffs; its identity's labels may arrive later.
    pub fn upsert_endpoint(&mut self, endpoint: EndpointId, identity: Identity) {
        if let Some(&old) = self.out.endpoints.get(&endpoint) {
            if old == identity {
                return;
            }
            self.remove_endpoint(endpoint);
        }
        self.out.settle();
        self.out.endpoints.insert(endpoint, identity);
        if let Some(subj) = self.out.subjects.get_mut(&identity) {
            subj.endpoints.push(endpoint);
            for key in subj.entries.keys() {
                self.out.out.push(PolicyDiff::Allow(unpack(endpoint, *key)));
            }
            let (ingress, egress) = subj.flags();
            if ingress || egress {
                self.out.out.push(PolicyDiff::Enforcement {
                    endpoint,
                    ingress,
                    egress,
                });
            }
            return;
        }
        self.out.subjects.insert(
            identity,
            Subject {
                endpoints: vec![endpoint],
                ..Subject::default()
            },
        );
        if let Some(st) = self.cache.identities.get(&identity) {
            for &s in &st.matched {
                for u in &self.cache.entry(s).users {
                    if let User::Subject(p) = *u {
                        activate(
                            &self.cache,
                            &mut self.policies,
                            &mut self.out,
                            p,
                            identity,
                            true,
                        );
                    }
                }
            }
        }
    }

    /// Forgets a local endpoint: revokes its entries and, if it was enforcing, clears its
    /// flags (`Enforcement { false, false }`); false if it was unknown.
    pub fn remove_endpoint(&mut self, endpoint: EndpointId) -> bool {
        let Some(identity) = self.out.endpoints.remove(&endpoint) else {
            return false;
        };
        self.out.settle();
        let Some(subj) = self.out.subjects.get_mut(&identity) else {
            return true;
        };
        for key in subj.entries.keys() {
            self.out
                .out
                .push(PolicyDiff::Revoke(unpack(endpoint, *key)));
        }
        if subj.flags() != (false, false) {
            // Cleared explicitly, so a move to another identity never leaves stale flags.
            self.out.out.push(PolicyDiff::Enforcement {
                endpoint,
                ingress: false,
                egress: false,
            });
        }
        subj.endpoints.retain(|e| *e != endpoint);
        if subj.endpoints.is_empty()
            && let Some(subj) = self.out.subjects.remove(&identity)
        {
            for p in subj.policies {
                if let Some(pol) = self.policies[p as usize].as_mut() {
                    pol.subjects.remove(&identity);
                }
            }
        }
        true
    }

    // ---- output ----

    /// Moves the net changes since the last call into `sink` (appended; `sink` keeps its
    /// allocation across calls).
    pub fn drain_diffs(&mut self, sink: &mut Vec<PolicyDiff>) {
        self.out.settle();
        sink.append(&mut self.out.out);
    }

    /// The net changes since the last call, in a new vector.
    pub fn take_diffs(&mut self) -> Vec<PolicyDiff> {
        let mut v = Vec::new();
        self.drain_diffs(&mut v);
        v
    }

    /// The current entries of one endpoint, sorted.
    pub fn endpoint_entries(&self, endpoint: EndpointId) -> Vec<PolicyEntry> {
        let mut v: Vec<PolicyEntry> = self
            .out
            .endpoints
            .get(&endpoint)
            .and_then(|i| self.out.subjects.get(i))
            .map(|s| s.entries.keys().map(|k| unpack(endpoint, *k)).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// The endpoint's default-deny flags `(ingress, egress)`.
    pub fn enforcement(&self, endpoint: EndpointId) -> (bool, bool) {
        self.out
            .endpoints
            .get(&endpoint)
            .and_then(|i| self.out.subjects.get(i))
            .map_or((false, false), Subject::flags)
    }

    /// Policies in force that select the endpoint, by namespace/name.
    pub fn policies_for_endpoint(&self, endpoint: EndpointId) -> Vec<PolicyRef> {
        let mut v: Vec<PolicyRef> = self
            .out
            .endpoints
            .get(&endpoint)
            .and_then(|i| self.out.subjects.get(i))
            .map(|s| {
                s.policies
                    .iter()
                    .filter_map(|p| self.policies[*p as usize].as_ref().map(|c| c.key.clone()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The whole current state (every endpoint's entries and enforced flags).
    pub fn state(&self) -> PolicyState {
        let mut st = PolicyState::default();
        for (ep, id) in &self.out.endpoints {
            if let Some(s) = self.out.subjects.get(id) {
                st.entries.extend(s.entries.keys().map(|k| unpack(*ep, *k)));
                if s.flags() != (false, false) {
                    st.enforcement.insert(*ep, s.flags());
                }
            }
        }
        st
    }

    /// Counts.
    pub fn stats(&self) -> PolicyStats {
        PolicyStats {
            identities: self.cache.identities.len(),
            selectors: self.cache.len(),
            policies: self.by_ref.len(),
            rejected: self.rejected.len(),
            endpoints: self.out.endpoints.len(),
            subjects: self.out.subjects.len(),
            entries: self
                .out
                .subjects
                .values()
                .map(|s| s.entries.len() * s.endpoints.len())
                .sum(),
        }
    }
}
