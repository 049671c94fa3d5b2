//! The `clusterset.local` zone handler: answers from the current [`DnsIndex`] (swapped
//! whenever the merged view publishes services), never touching etcd per query.

use std::sync::{Arc, RwLock};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::SRV;
use hickory_proto::rr::{LowerName, RData, RecordSet, RecordType, TSigResponseContext};
use hickory_server::server::{Request, RequestInfo};
use hickory_server::zone_handler::{
    AuthLookup, AxfrPolicy, LookupControlFlow, LookupError, LookupOptions, LookupRecords,
    ZoneHandler, ZoneType,
};

use super::index::{Answer, DnsIndex};

/// Shared, swappable index. Readers clone the `Arc` under a short read lock.
pub type SharedIndex = Arc<RwLock<Arc<DnsIndex>>>;

/// Most additional records (SRV targets' addresses) added to one answer.
const MAX_ADDITIONALS: usize = 32;

/// The zone handler registered in the catalog for `clusterset.local.`.
#[derive(Debug)]
pub struct ClustersetZone {
    origin: LowerName,
    index: SharedIndex,
}

impl ClustersetZone {
    /// A handler reading `index`.
    pub fn new(index: SharedIndex) -> Self {
        let origin = current(&index).origin().clone();
        Self { origin, index }
    }
}

/// The index in force.
pub fn current(index: &SharedIndex) -> Arc<DnsIndex> {
    match index.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// Addresses of the SRV targets in `set`, for the additional section.
fn srv_additionals(index: &DnsIndex, set: &RecordSet) -> Vec<Arc<RecordSet>> {
    let mut out = Vec::new();
    for r in set.records_without_rrsigs() {
        let RData::SRV(SRV { target, .. }) = &r.data else {
            continue;
        };
        let target = LowerName::new(target);
        for t in [RecordType::A, RecordType::AAAA] {
            if let Answer::Records(s) = index.lookup(&target, t)
                && out.len() < MAX_ADDITIONALS
                && !out.iter().any(|o: &Arc<RecordSet>| Arc::ptr_eq(o, s))
            {
                out.push(s.clone());
            }
        }
    }
    out
}

#[async_trait::async_trait]
impl ZoneHandler for ClustersetZone {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        AxfrPolicy::Deny
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        _request_info: Option<&RequestInfo<'_>>,
        options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        let index = current(&self.index);
        match index.lookup(name, rtype) {
            Answer::Records(set) => {
                let additionals = (rtype == RecordType::SRV)
                    .then(|| srv_additionals(&index, set))
                    .filter(|a| !a.is_empty())
                    .map(|a| LookupRecords::many(options, a));
                LookupControlFlow::Continue(Ok(AuthLookup::answers(
                    LookupRecords::new(options, set.clone()),
                    additionals,
                )))
            }
            Answer::NoData => LookupControlFlow::Continue(Err(LookupError::NameExists)),
            Answer::NxDomain => {
                LookupControlFlow::Continue(Err(LookupError::from(ResponseCode::NXDomain)))
            }
            Answer::NotInZone => {
                LookupControlFlow::Continue(Err(LookupError::from(ResponseCode::Refused)))
            }
        }
    }

    async fn search(
        &self,
        request: &Request,
        options: LookupOptions,
    ) -> (LookupControlFlow<AuthLookup>, Option<TSigResponseContext>) {
        let info = match request.request_info() {
            Ok(info) => info,
            Err(e) => return (LookupControlFlow::Break(Err(e)), None),
        };
        let rtype = info.query.query_type();
        if matches!(rtype, RecordType::AXFR | RecordType::IXFR) {
            return (
                LookupControlFlow::Break(Err(LookupError::from(ResponseCode::Refused))),
                None,
            );
        }
        (
            self.lookup(info.query.name(), rtype, Some(&info), options)
                .await,
            None,
        )
    }

    async fn nsec_records(
        &self,
        _name: &LowerName,
        _options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Continue(Ok(AuthLookup::default()))
    }
}
