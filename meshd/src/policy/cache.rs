//! The selector cache: each distinct selector → the identities it matches, kept up to date
//! per identity event through a label index (only candidate selectors are evaluated).
//!
//! Each selector is indexed under one equality requirement (`matchLabels` key=value, or
//! every value of an `In` expression), the one with the fewest identities when the
//! selector is created; selectors with no equality requirement are "unindexed" and
//! evaluated against every new identity. An identity event looks up its labels' `(key,
//! value)` pairs in the index, so it costs O(labels + candidates), not O(selectors). A new
//! selector is evaluated against the identities of its index entry (all identities only if
//! it is unindexed). Users (which policy rule refers to a selector) live in the entry; the
//! entry is dropped with its last user.

use std::collections::{HashMap, HashSet};

use crate::model::{Identity, LabelSelector, Labels, SelectorOperator};

/// Index of a selector in the cache (stable while the selector has users).
pub(crate) type SelectorId = u32;
/// Index of a policy in the engine's slab.
pub(crate) type PolicyIdx = u32;

/// Who refers to a selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum User {
    /// The policy's endpoint selector.
    Subject(PolicyIdx),
    /// A peer of rule `rule` in direction `dir` of the policy.
    Peer {
        /// The policy.
        policy: PolicyIdx,
        /// `Direction::index`.
        dir: u8,
        /// Rule index.
        rule: u32,
    },
}

/// Where a selector is indexed.
#[derive(Debug, Clone)]
enum IndexKey {
    /// Under `key` (bare, without source) and each of `values`.
    Keyed { key: String, values: Vec<String> },
    /// Evaluated against every identity.
    Unindexed,
}

#[derive(Debug)]
pub(crate) struct SelectorEntry {
    pub(crate) selector: LabelSelector,
    pub(crate) matches: HashSet<Identity>,
    pub(crate) users: Vec<User>,
    index: IndexKey,
}

#[derive(Debug)]
pub(crate) struct IdentityState {
    pub(crate) labels: Labels,
    /// Selectors that match this identity.
    pub(crate) matched: Vec<SelectorId>,
}

/// `key → value → items`, looked up by `&str` without allocating.
type LabelIndex<T> = HashMap<String, HashMap<String, Vec<T>>>;

fn index_insert<T>(idx: &mut LabelIndex<T>, key: &str, value: &str, item: T) {
    let by_value = match idx.get_mut(key) {
        Some(m) => m,
        None => idx.entry(key.to_owned()).or_default(),
    };
    match by_value.get_mut(value) {
        Some(v) => v.push(item),
        None => {
            by_value.insert(value.to_owned(), vec![item]);
        }
    }
}

fn index_remove<T: PartialEq>(idx: &mut LabelIndex<T>, key: &str, value: &str, item: &T) {
    if let Some(by_value) = idx.get_mut(key) {
        if let Some(v) = by_value.get_mut(value) {
            if let Some(pos) = v.iter().position(|x| x == item) {
                v.swap_remove(pos);
            }
            if v.is_empty() {
                by_value.remove(value);
            }
        }
        if by_value.is_empty() {
            idx.remove(key);
        }
    }
}

fn bare(key: &str) -> &str {
    match key.split_once(':') {
        Some(("k8s" | "mesh" | "reserved" | "any", k)) => k,
        _ => key,
    }
}

/// The selector cache plus the identity table it matches against.
#[derive(Debug, Default)]
pub(crate) struct SelectorCache {
    entries: Vec<Option<SelectorEntry>>,
    free: Vec<SelectorId>,
    by_selector: HashMap<LabelSelector, SelectorId>,
    sel_index: LabelIndex<SelectorId>,
    unindexed: Vec<SelectorId>,
    pub(crate) identities: HashMap<Identity, IdentityState>,
    /// Label `(key, value)` → identities carrying it (source ignored).
    id_index: HashMap<String, HashMap<String, HashSet<Identity>>>,
}

impl SelectorCache {
    pub(crate) fn entry(&self, id: SelectorId) -> &SelectorEntry {
        self.entries[id as usize]
            .as_ref()
            .expect("selector ids in use point at live entries")
    }

    fn entry_mut(&mut self, id: SelectorId) -> &mut SelectorEntry {
        self.entries[id as usize]
            .as_mut()
            .expect("selector ids in use point at live entries")
    }

    /// Number of live selectors.
    pub(crate) fn len(&self) -> usize {
        self.by_selector.len()
    }

    fn count(&self, key: &str, value: &str) -> usize {
        self.id_index
            .get(key)
            .and_then(|m| m.get(value))
            .map_or(0, HashSet::len)
    }

    /// Picks the most selective equality requirement (fewest identities now; scoping keys
    /// namespace/cluster lose ties).
    fn choose_index(&self, s: &LabelSelector) -> IndexKey {
        let scoping =
            |k: &str| k == crate::model::NAMESPACE_LABEL || k == crate::model::CLUSTER_LABEL;
        let mut candidates: Vec<(&str, Vec<&str>)> = s
            .match_labels
            .iter()
            .map(|(k, v)| (bare(k), vec![v.as_str()]))
            .collect();
        candidates.extend(
            s.match_expressions
                .iter()
                .filter(|e| e.operator == SelectorOperator::In)
                .map(|e| (bare(&e.key), e.values.iter().map(String::as_str).collect())),
        );
        let best = candidates.into_iter().min_by_key(|(k, values)| {
            let n: usize = values.iter().map(|v| self.count(k, v)).sum();
            (n, scoping(k), values.len())
        });
        match best {
            Some((k, values)) => IndexKey::Keyed {
                key: k.to_owned(),
                values: values.into_iter().map(str::to_owned).collect(),
            },
            None => IndexKey::Unindexed,
        }
    }

    /// Registers `user` of `selector`, creating (and evaluating) the entry if it is new.
    pub(crate) fn acquire(&mut self, selector: LabelSelector, user: User) -> SelectorId {
        if let Some(&id) = self.by_selector.get(&selector) {
            self.entry_mut(id).users.push(user);
            return id;
        }
        let index = self.choose_index(&selector);
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.entries.push(None);
                (self.entries.len() - 1) as SelectorId
            }
        };
        // Initial matches: the index entry's identities, or all when unindexed.
        let mut matches = HashSet::new();
        match &index {
            IndexKey::Keyed { key, values } => {
                for v in values {
                    if let Some(ids) = self.id_index.get(key.as_str()).and_then(|m| m.get(v)) {
                        for i in ids {
                            if selector.matches(&self.identities[i].labels) {
                                matches.insert(*i);
                            }
                        }
                    }
                }
                for v in values {
                    index_insert(&mut self.sel_index, key, v, id);
                }
            }
            IndexKey::Unindexed => {
                for (i, st) in &self.identities {
                    if selector.matches(&st.labels) {
                        matches.insert(*i);
                    }
                }
                self.unindexed.push(id);
            }
        }
        for i in &matches {
            if let Some(st) = self.identities.get_mut(i) {
                st.matched.push(id);
            }
        }
        self.by_selector.insert(selector.clone(), id);
        self.entries[id as usize] = Some(SelectorEntry {
            selector,
            matches,
            users: vec![user],
            index,
        });
        id
    }

    /// Drops `user` of `id`; the entry goes with its last user.
    pub(crate) fn release(&mut self, id: SelectorId, user: User) {
        let e = self.entry_mut(id);
        if let Some(pos) = e.users.iter().position(|u| *u == user) {
            e.users.swap_remove(pos);
        }
        if !e.users.is_empty() {
            return;
        }
        let e = self.entries[id as usize]
            .take()
            .expect("checked live above");
        for i in &e.matches {
            if let Some(st) = self.identities.get_mut(i)
                && let Some(pos) = st.matched.iter().position(|s| *s == id)
            {
                st.matched.swap_remove(pos);
            }
        }
        match &e.index {
            IndexKey::Keyed { key, values } => {
                for v in values {
                    index_remove(&mut self.sel_index, key, v, &id);
                }
            }
            IndexKey::Unindexed => self.unindexed.retain(|s| *s != id),
        }
        self.by_selector.remove(&e.selector);
        self.free.push(id);
    }

    /// Fills `out` with the selectors matching `labels` (sorted, deduplicated), evaluating
    /// only the index's candidates and the unindexed selectors.
    pub(crate) fn matching(&self, labels: &Labels, out: &mut Vec<SelectorId>) {
        out.clear();
        for l in labels {
            if let Some(ids) = self
                .sel_index
                .get(l.key.as_str())
                .and_then(|m| m.get(&l.value))
            {
                out.extend_from_slice(ids);
            }
        }
        out.extend_from_slice(&self.unindexed);
        out.sort_unstable();
        out.dedup();
        out.retain(|s| self.entry(*s).selector.matches(labels));
    }

    /// Records a new identity that matches exactly `matched` (from [`Self::matching`]).
    pub(crate) fn insert_identity(&mut self, id: Identity, labels: Labels, matched: &[SelectorId]) {
        for s in matched {
            self.entry_mut(*s).matches.insert(id);
        }
        for l in &labels {
            let by_value = match self.id_index.get_mut(l.key.as_str()) {
                Some(m) => m,
                None => self.id_index.entry(l.key.clone()).or_default(),
            };
            match by_value.get_mut(l.value.as_str()) {
                Some(set) => {
                    set.insert(id);
                }
                None => {
                    by_value.insert(l.value.clone(), HashSet::from([id]));
                }
            }
        }
        self.identities.insert(
            id,
            IdentityState {
                labels,
                matched: matched.to_vec(),
            },
        );
    }

    /// Forgets an identity; returns its state.
    pub(crate) fn remove_identity(&mut self, id: Identity) -> Option<IdentityState> {
        let st = self.identities.remove(&id)?;
        for s in &st.matched {
            self.entry_mut(*s).matches.remove(&id);
        }
        for l in &st.labels {
            if let Some(by_value) = self.id_index.get_mut(l.key.as_str()) {
                if let Some(set) = by_value.get_mut(l.value.as_str()) {
                    set.remove(&id);
                    if set.is_empty() {
                        by_value.remove(l.value.as_str());
                    }
                }
                if by_value.is_empty() {
                    self.id_index.remove(l.key.as_str());
                }
            }
        }
        Some(st)
    }
}
