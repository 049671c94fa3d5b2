//! The DNS server on loopback: every MCS rule, negative answers, forwarding, updates, and
//! hostile packets, queried with raw hickory messages and with hickory-resolver.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use meshd::model::{Affinity, BackendPort, ClusterName, Protocol, ServicePort};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Bound, DnsConfig, DnsMetrics, serve};
use crate::view::{MergedBackend, MergedService, ServiceKey, ServicesSnapshot};

fn cn(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

fn backend(cluster: &str, ip: &str, host: Option<&str>, ready: bool) -> MergedBackend {
    MergedBackend {
        cluster: cn(cluster),
        ip: ip.parse().unwrap(),
        ports: vec![BackendPort {
            name: "postgres".into(),
            port: 5432,
            protocol: Protocol::Tcp,
        }],
        hostname: host.map(str::to_owned),
        node: None,
        zone: None,
        ready,
    }
}

fn web(ip: &str) -> MergedService {
    MergedService {
        namespace: "shop".into(),
        name: "web".into(),
        headless: false,
        ports: vec![
            ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            ServicePort {
                name: String::new(),
                port: 81,
                protocol: Protocol::Tcp,
            },
            ServicePort {
                name: "dns".into(),
                port: 53,
                protocol: Protocol::Udp,
            },
        ],
        frontends_local: vec![],
        clusterset_ip: Some(ip.parse().unwrap()),
        backends: vec![],
        active_backends: vec![],
        affinity: Affinity::None,
        conflicts: vec![],
        clusters: vec![cn("east"), cn("west")],
    }
}

fn db(backends: Vec<MergedBackend>) -> MergedService {
    MergedService {
        namespace: "shop".into(),
        name: "db".into(),
        headless: true,
        ports: vec![ServicePort {
            name: "postgres".into(),
            port: 5432,
            protocol: Protocol::Tcp,
        }],
        frontends_local: vec![],
        clusterset_ip: None,
        backends,
        active_backends: vec![],
        affinity: Affinity::Local,
        conflicts: vec![],
        clusters: vec![cn("east"), cn("west")],
    }
}

fn snapshot(generation: u64, services: Vec<MergedService>) -> Arc<ServicesSnapshot> {
    let mut entries = BTreeMap::new();
    for s in services {
        entries.insert(ServiceKey::new(&s.namespace, &s.name), Arc::new(s));
    }
    Arc::new(ServicesSnapshot {
        generation,
        entries,
    })
}

fn sample(generation: u64, west_db1_ready: bool) -> Arc<ServicesSnapshot> {
    let mut empty = db(vec![backend("east", "198.18.1.39", None, false)]);
    empty.name = "empty".into();
    snapshot(
        generation,
        vec![
            web("198.19.129.1"),
            db(vec![
                backend("east", "198.18.1.31", Some("db-0"), true),
                backend("east", "198.18.1.32", Some("db-1"), true),
                backend("west", "198.18.2.31", Some("db-0"), true),
                backend("west", "198.18.2.32", Some("db-1"), west_db1_ready),
                backend("west", "198.18.2.33", None, true),
            ]),
            empty,
        ],
    )
}

struct Running {
    addr: SocketAddr,
    tx: watch::Sender<Arc<ServicesSnapshot>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), super::DnsError>>,
}

impl Running {
    async fn start(upstreams: Vec<SocketAddr>) -> Self {
        let (tx, rx) = watch::channel(sample(1, true));
        let mut cfg = DnsConfig::new("127.0.0.1:0".parse().unwrap());
        cfg.upstreams = upstreams;
        let stop = CancellationToken::new();
        let (btx, brx) = tokio::sync::oneshot::channel::<Bound>();
        let task = tokio::spawn(serve(
            cfg,
            rx,
            DnsMetrics::default(),
            Some(btx),
            stop.clone(),
        ));
        let addr = brx.await.expect("bound").udp;
        Self {
            addr,
            tx,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn ask_with(addr: SocketAddr, msg: &Message) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&msg.to_vec().unwrap(), addr).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

/// An A query with up to three 1-second tries, as a stub resolver retries over UDP.
async fn ask_retrying(addr: SocketAddr, name: &str) -> Message {
    let q = query(name, RecordType::A).to_vec().unwrap();
    for _ in 0..3 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&q, addr).await.unwrap();
        let mut buf = vec![0u8; 65_535];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await
        {
            return Message::from_vec(&buf[..n]).unwrap();
        }
    }
    panic!("no answer to {name} in three tries");
}

fn query(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), rtype));
    m
}

async fn ask(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
    ask_with(addr, &query(name, rtype)).await
}

fn rdatas(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

fn has_soa(m: &Message) -> bool {
    m.authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

#[tokio::test]
async fn dns_answers_every_mcs_rule() {
    let s = Running::start(vec![]).await;
    let a = s.addr;

    // Version TXT, SOA, NS.
    let m = ask(a, "dns-version.clusterset.local.", RecordType::TXT).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(rdatas(&m), ["1.0.0"]);
    let m = ask(a, "clusterset.local.", RecordType::SOA).await;
    assert_eq!(m.answers.len(), 1, "{m:?}");
    let m = ask(a, "clusterset.local.", RecordType::NS).await;
    assert_eq!(rdatas(&m), ["ns.dns.clusterset.local."]);

    // ClusterSetIP service: A, NODATA for AAAA, SRV for named ports only.
    let m = ask(a, "web.shop.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(rdatas(&m), ["198.19.129.1"]);
    assert_eq!(m.answers[0].ttl, 5);
    let m = ask(a, "web.shop.svc.clusterset.local.", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(
        m.answers.is_empty() && has_soa(&m),
        "NODATA with SOA: {m:?}"
    );
    let m = ask(
        a,
        "_http._tcp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(rdatas(&m), ["0 100 80 web.shop.svc.clusterset.local."]);
    assert!(
        m.additionals
            .iter()
            .any(|r| r.data == RData::A(Ipv4Addr::new(198, 19, 129, 1).into())),
        "SRV target address in additionals: {m:?}"
    );
    let m = ask(
        a,
        "_dns._udp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(rdatas(&m), ["0 100 53 web.shop.svc.clusterset.local."]);
    let m = ask(
        a,
        "_dns._tcp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // Headless: ready endpoints of every cluster, per-endpoint names, SRV per endpoint.
    let m = ask(a, "db.shop.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(
        rdatas(&m),
        [
            "198.18.1.31",
            "198.18.1.32",
            "198.18.2.31",
            "198.18.2.32",
            "198.18.2.33"
        ]
    );
    let m = ask(a, "db-0.west.db.shop.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(rdatas(&m), ["198.18.2.31"]);
    let m = ask(
        a,
        "198-18-2-33.west.db.shop.svc.clusterset.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(rdatas(&m), ["198.18.2.33"]);
    let m = ask(
        a,
        "_postgres._tcp.db.shop.svc.clusterset.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(m.answers.len(), 5, "{m:?}");
    assert!(
        rdatas(&m).contains(&"0 100 5432 db-1.east.db.shop.svc.clusterset.local.".to_owned()),
        "{m:?}"
    );
    // <clusterid>.<svc>.<ns>.svc.clusterset.local must not exist.
    let m = ask(a, "west.db.shop.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&m), "NXDOMAIN carries the SOA: {m:?}");
    // A headless service without ready endpoints, and a service that is not global.
    for name in [
        "empty.shop.svc.clusterset.local.",
        "ledger.payments.svc.clusterset.local.",
    ] {
        let m = ask(a, name, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
    // Case-insensitive.
    let m = ask(a, "WEB.Shop.SVC.clusterset.LOCAL.", RecordType::A).await;
    assert_eq!(rdatas(&m), ["198.19.129.1"]);

    // ANY, another class, out of zone without upstreams, zone transfers.
    let m = ask(a, "web.shop.svc.clusterset.local.", RecordType::ANY).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    let mut ch = query("web.shop.svc.clusterset.local.", RecordType::A);
    ch.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(
        ask_with(a, &ch).await.metadata.response_code,
        ResponseCode::Refused
    );
    let m = ask(a, "example.org.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let m = ask(a, "clusterset.local.", RecordType::AXFR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    // Updates: a remote endpoint goes unready (the exporter drops it), the answer follows.
    s.tx.send(sample(2, false)).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = ask(a, "db.shop.svc.clusterset.local.", RecordType::A).await;
        if !rdatas(&m).contains(&"198.18.2.32".to_owned()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "answer never changed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = ask(a, "db-1.west.db.shop.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // hickory-resolver as a client.
    let r = resolver(a);
    let ips: Vec<IpAddr> = r
        .lookup_ip("web.shop.svc.clusterset.local.")
        .await
        .unwrap()
        .iter()
        .collect();
    assert_eq!(ips, [IpAddr::from([198, 19, 129, 1])]);
    let srv = r
        .srv_lookup("_postgres._tcp.db.shop.svc.clusterset.local.")
        .await
        .unwrap();
    assert_eq!(srv.answers().len(), 4);
    s.stop().await;
}

fn resolver(
    addr: SocketAddr,
) -> hickory_resolver::Resolver<hickory_resolver::net::runtime::TokioRuntimeProvider> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    let mut c = ConnectionConfig::udp();
    c.port = addr.port();
    let mut cfg =
        ResolverConfig::from_name_servers(vec![NameServerConfig::new(addr.ip(), true, vec![c])]);
    cfg.set_domain(Name::root());
    hickory_resolver::Resolver::builder_with_config(
        cfg,
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    )
    .build()
    .unwrap()
}

/// An upstream authoritative for `example.test.` (hickory's in-memory zone).
async fn upstream() -> (
    SocketAddr,
    hickory_server::Server<hickory_server::zone_handler::Catalog>,
) {
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{LowerName, Record};
    use hickory_server::store::in_memory::InMemoryZoneHandler;
    use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
    let origin = Name::from_str("example.test.").unwrap();
    let mut zone: InMemoryZoneHandler =
        InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    zone.upsert_mut(
        Record::from_rdata(
            origin.clone(),
            60,
            RData::SOA(SOA::new(origin.clone(), origin.clone(), 1, 60, 60, 60, 60)),
        ),
        1,
    );
    zone.upsert_mut(
        Record::from_rdata(
            Name::from_str("www.example.test.").unwrap(),
            60,
            RData::A(A::new(198, 18, 200, 1)),
        ),
        1,
    );
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let mut server = hickory_server::Server::new(catalog);
    server.register_socket(sock);
    (addr, server)
}

#[tokio::test]
async fn dns_forwards_other_names_upstream() {
    let (up, mut up_server) = upstream().await;
    let s = Running::start(vec![up]).await;
    let m = ask(s.addr, "www.example.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    assert_eq!(rdatas(&m), ["198.18.200.1"]);
    let m = ask(s.addr, "nope.example.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{m:?}");
    // The zone is still ours.
    let m = ask(s.addr, "web.shop.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(rdatas(&m), ["198.19.129.1"]);
    s.stop().await;
    up_server.shutdown_gracefully().await.unwrap();
}

#[tokio::test]
async fn dns_survives_hostile_packets() {
    let s = Running::start(vec![]).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Garbage of many sizes, truncated headers, a header claiming 60k questions.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in [0usize, 1, 5, 11, 12, 13, 64, 300, 512, 1500, 4096, 65_000] {
        let mut pkt = vec![0u8; len];
        for b in &mut pkt {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed.to_le_bytes()[0];
        }
        let _ = sock.send_to(&pkt, s.addr).await;
    }
    let mut lying = query("web.shop.svc.clusterset.local.", RecordType::A)
        .to_vec()
        .unwrap();
    lying[4] = 0xea; // qdcount high byte: 60k questions announced, one present
    sock.send_to(&lying, s.addr).await.unwrap();
    let m = ask_retrying(s.addr, "web.shop.svc.clusterset.local.").await;
    assert_eq!(rdatas(&m), ["198.19.129.1"]);
    // Two questions in one message: FORMERR.
    let mut two = query("web.shop.svc.clusterset.local.", RecordType::A);
    two.add_query(Query::query(
        Name::from_str("db.shop.svc.clusterset.local.").unwrap(),
        RecordType::A,
    ));
    let m = ask_with(s.addr, &two).await;
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A flood of random names answers NXDOMAIN and does not stop good answers.
    for i in 0..2000u32 {
        let q = query(
            &format!(
                "x{i:x}.y{}.svc.clusterset.local.",
                i.wrapping_mul(2_654_435_761)
            ),
            RecordType::A,
        );
        let _ = sock.send_to(&q.to_vec().unwrap(), s.addr).await;
    }
    // The kernel drops what overflows the socket buffer during the burst (UDP); a client
    // retrying after a second, as resolvers do, is answered.
    let m = ask_retrying(s.addr, "web.shop.svc.clusterset.local.").await;
    assert_eq!(rdatas(&m), ["198.19.129.1"]);
    s.stop().await;
}

mod fuzz {
    //! Bounded fuzzing of the query path: random bytes and random mutations of a valid query
    //! go to the running server; it must keep answering a good query after each batch.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
        #[test]
        fn dns_fuzz_query_path(
            junk in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..8),
            flips in proptest::collection::vec((0usize..64, any::<u8>()), 0..12),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let s = Running::start(vec![]).await;
                let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                for pkt in &junk {
                    let _ = sock.send_to(pkt, s.addr).await;
                }
                let mut mutated = query("_http._tcp.web.shop.svc.clusterset.local.", RecordType::SRV).to_vec().unwrap();
                for (i, v) in &flips {
                    let n = mutated.len();
                    mutated[i % n] = *v;
                }
                let _ = sock.send_to(&mutated, s.addr).await;
                let m = ask(s.addr, "web.shop.svc.clusterset.local.", RecordType::A).await;
                assert_eq!(rdatas(&m), ["198.19.129.1"]);
                s.stop().await;
            });
        }
    }
}
