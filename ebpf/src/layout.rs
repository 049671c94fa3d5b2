//! The `#[repr(C)]` mirror of every key and value in `mesh.h` (network-order fields stay raw).

use std::net::Ipv4Addr;

/// IANA protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// In policy keys: any protocol.
pub const PROTO_ANY: u8 = 0;

/// `MESH_EP_F_ENFORCE_INGRESS`: default-deny traffic to the endpoint.
pub const EP_F_ENFORCE_INGRESS: u16 = 0x1;
/// `MESH_EP_F_ENFORCE_EGRESS`: default-deny traffic from the endpoint.
pub const EP_F_ENFORCE_EGRESS: u16 = 0x2;
/// `MESH_IDENTITY_WORLD`: the identity of addresses missing from the ipcache.
pub const IDENTITY_WORLD: u32 = 2;

/// `enum mesh_direction`: always from the endpoint's point of view.
pub mod direction {
    /// To the endpoint (tc egress hook of its host-side interface).
    pub const INGRESS: u8 = 0;
    /// From the endpoint (tc ingress hook of its host-side interface).
    pub const EGRESS: u8 = 1;
}

/// `enum mesh_policy_action`.
pub mod action {
    /// Allow the flow (and track it).
    pub const ALLOW: u8 = 1;
    /// Drop with reason `DROP_DENY`.
    pub const DENY: u8 = 2;
}

/// `enum mesh_verdict`: the index of each counter in `mesh_verdicts`.
pub mod verdict {
    /// New flow allowed by a policy entry.
    pub const ALLOW_POLICY: u32 = 0;
    /// Packet of a tracked flow, either way.
    pub const ALLOW_CT: u32 = 1;
    /// The endpoint enforces no policy in this direction.
    pub const ALLOW_UNENFORCED: u32 = 2;
    /// Not an IPv4 packet of a known endpoint.
    pub const ALLOW_UNMANAGED: u32 = 3;
    /// No allow entry matched (default deny).
    pub const DROP_POLICY: u32 = 4;
    /// An explicit deny entry matched.
    pub const DROP_DENY: u32 = 5;
    /// The endpoint's address on another interface than its own.
    pub const DROP_SPOOF: u32 = 6;
    /// Truncated IPv4 or L4 header.
    pub const DROP_MALFORMED: u32 = 7;
    /// Number of verdicts (entries of `mesh_verdicts`).
    pub const MAX: u32 = 8;

    /// Every verdict with its C enumerator name.
    pub const ALL: [(&str, u32); 9] = [
        ("MESH_VERDICT_ALLOW_POLICY", ALLOW_POLICY),
        ("MESH_VERDICT_ALLOW_CT", ALLOW_CT),
        ("MESH_VERDICT_ALLOW_UNENFORCED", ALLOW_UNENFORCED),
        ("MESH_VERDICT_ALLOW_UNMANAGED", ALLOW_UNMANAGED),
        ("MESH_VERDICT_DROP_POLICY", DROP_POLICY),
        ("MESH_VERDICT_DROP_DENY", DROP_DENY),
        ("MESH_VERDICT_DROP_SPOOF", DROP_SPOOF),
        ("MESH_VERDICT_DROP_MALFORMED", DROP_MALFORMED),
        ("MESH_VERDICT_MAX", MAX),
    ];

    /// A short lowercase name (metrics labels, logs).
    pub fn name(v: u32) -> &'static str {
        match v {
            ALLOW_POLICY => "allow_policy",
            ALLOW_CT => "allow_ct",
            ALLOW_UNENFORCED => "allow_unenforced",
            ALLOW_UNMANAGED => "allow_unmanaged",
            DROP_POLICY => "drop_policy",
            DROP_DENY => "drop_deny",
            DROP_SPOOF => "drop_spoof",
            DROP_MALFORMED => "drop_malformed",
            _ => "unknown",
        }
    }
}

fn be_ip(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn ip_of(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// `struct mesh_lb4_key`: a service (slot 0, the master entry) or one backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4Key {
    /// VIP, network order.
    pub address: u32,
    /// Service port, network order.
    pub dport: u16,
    /// 0 = master entry, 1..=count = backend slots.
    pub backend_slot: u16,
    /// IP protocol.
    pub proto: u8,
    /// Padding, zero.
    pub pad: [u8; 3],
}

impl Lb4Key {
    /// The key of `vip:port/proto` at `slot`.
    pub fn new(vip: Ipv4Addr, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            address: be_ip(vip),
            dport: port.to_be(),
            backend_slot: slot,
            proto,
            pad: [0; 3],
        }
    }
    /// The VIP.
    pub fn ip(&self) -> Ipv4Addr {
        ip_of(self.address)
    }
    /// The service port (host order).
    pub fn port(&self) -> u16 {
        u16::from_be(self.dport)
    }
}

/// `struct mesh_lb4_service`: master entry (count) or slot (backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4Service {
    /// Slot > 0: the backend id; slot 0: 0.
    pub backend_id: u32,
    /// Slot 0: number of backend slots.
    pub count: u16,
    /// Reserved, zero.
    pub flags: u16,
}

/// `struct mesh_lb4_backend` (key: `u32` backend id, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4Backend {
    /// Network order.
    pub address: u32,
    /// Network order.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Reserved, zero.
    pub flags: u8,
}

impl Lb4Backend {
    /// A backend at `ip:port/proto`.
    pub fn new(ip: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            address: be_ip(ip),
            port: port.to_be(),
            proto,
            flags: 0,
        }
    }
    /// The backend address.
    pub fn ip(&self) -> Ipv4Addr {
        ip_of(self.address)
    }
    /// The backend port (host order).
    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// `struct mesh_lb4_revnat_key`: socket cookie + the backend it was steered to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4RevNatKey {
    /// Socket cookie.
    pub cookie: u64,
    /// Backend address, network order.
    pub address: u32,
    /// Backend port, network order.
    pub port: u16,
    /// Padding, zero.
    pub pad: u16,
}

/// `struct mesh_lb4_revnat_value`: the VIP:port the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4RevNatValue {
    /// Network order.
    pub address: u32,
    /// Network order.
    pub port: u16,
    /// Padding, zero.
    pub pad: u16,
}

/// `struct mesh_ipcache_key`: LPM trie key. aya's `LpmTrie` wraps the address in its own
/// `Key<K>` (prefix length first), which has exactly this layout with `K = u32`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheKey {
    /// Number of significant bits of `address`.
    pub prefixlen: u32,
    /// Network order.
    pub address: u32,
}

impl IpcacheKey {
    /// `ip/prefixlen`.
    pub fn new(ip: Ipv4Addr, prefixlen: u32) -> Self {
        Self {
            prefixlen,
            address: be_ip(ip),
        }
    }
}

/// `struct mesh_ipcache_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    /// Security identity of the prefix.
    pub identity: u32,
    /// Cluster the prefix belongs to.
    pub cluster_id: u16,
    /// Reserved, zero.
    pub flags: u16,
}

/// `struct mesh_endpoint_value` (key: the endpoint's IPv4 address as a network-order `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointValue {
    /// The policy key's endpoint id.
    pub endpoint_id: u32,
    /// The endpoint's own identity (drop events).
    pub identity: u32,
    /// Host-side interface; 0 = not checked.
    pub ifindex: u32,
    /// `EP_F_*`.
    pub flags: u16,
    /// Padding, zero.
    pub pad: u16,
}

/// The `mesh_endpoints` key of an endpoint address.
pub fn endpoint_key(ip: Ipv4Addr) -> u32 {
    be_ip(ip)
}

/// The address of a `mesh_endpoints` key (or any network-order `u32` address field).
pub fn endpoint_ip(key: u32) -> Ipv4Addr {
    ip_of(key)
}

/// `struct mesh_policy_key`: identity 0, port 0 and protocol 0 are wildcards.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Local endpoint id.
    pub endpoint_id: u32,
    /// Remote identity; 0 = any.
    pub identity: u32,
    /// Destination port, network order; 0 = any.
    pub dport: u16,
    /// IP protocol; 0 = any.
    pub proto: u8,
    /// `direction::*`.
    pub direction: u8,
}

impl PolicyKey {
    /// A key with the port given in host order.
    pub fn new(endpoint_id: u32, identity: u32, port: u16, proto: u8, direction: u8) -> Self {
        Self {
            endpoint_id,
            identity,
            dport: port.to_be(),
            proto,
            direction,
        }
    }
    /// The port in host order.
    pub fn port(&self) -> u16 {
        u16::from_be(self.dport)
    }
}

/// `struct mesh_policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// `action::*`.
    pub action: u8,
    /// Padding, zero.
    pub pad: [u8; 3],
    /// Opaque rule id for observability.
    pub rule_id: u32,
}

/// `struct mesh_ct_key`: the first packet's tuple and the direction it was checked in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Network order.
    pub saddr: u32,
    /// Network order.
    pub daddr: u32,
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// `direction::*`.
    pub direction: u8,
    /// Padding, zero.
    pub pad: u16,
}

/// `struct mesh_ct_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` at creation.
    pub created_ns: u64,
    /// The endpoint whose hook created it.
    pub endpoint_id: u32,
    /// Padding, zero.
    pub pad: u32,
}

/// `struct mesh_counter`: one per verdict per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (`skb->len`).
    pub bytes: u64,
}

/// `struct mesh_drop_event`: one ring-buffer record per dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()`.
    pub timestamp_ns: u64,
    /// Network order.
    pub saddr: u32,
    /// Network order.
    pub daddr: u32,
    /// Identity of the source.
    pub src_identity: u32,
    /// Identity of the destination.
    pub dst_identity: u32,
    /// Local endpoint id.
    pub endpoint_id: u32,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    /// Cluster of the remote peer (from the ipcache; 0 when unknown).
    pub remote_cluster_id: u16,
    /// IP protocol.
    pub proto: u8,
    /// `direction::*`.
    pub direction: u8,
    /// `verdict::DROP_*`.
    pub reason: u8,
    /// Padding, zero.
    pub pad: [u8; 7],
}

impl DropEvent {
    /// Decodes a ring-buffer record; `None` when it has the wrong size.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != size_of::<Self>() {
            return None;
        }
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[0..8]);
        Some(Self {
            timestamp_ns: u64::from_ne_bytes(ts),
            saddr: u32_at(8),
            daddr: u32_at(12),
            src_identity: u32_at(16),
            dst_identity: u32_at(20),
            endpoint_id: u32_at(24),
            ifindex: u32_at(28),
            sport: u16_at(32),
            dport: u16_at(34),
            remote_cluster_id: u16_at(36),
            proto: b[38],
            direction: b[39],
            reason: b[40],
            pad: [0; 7],
        })
    }
    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        ip_of(self.saddr)
    }
    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        ip_of(self.daddr)
    }
    /// Destination port, host order.
    pub fn dst_port(&self) -> u16 {
        u16::from_be(self.dport)
    }
    /// Source port, host order.
    pub fn src_port(&self) -> u16 {
        u16::from_be(self.sport)
    }
}

// SAFETY (all impls below): `#[repr(C)]`, `Copy`, only integer fields and explicit
// padding, so every bit pattern is valid and there are no uninitialised bytes.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {$(
        #[allow(unsafe_code)]
        unsafe impl aya::Pod for $t {}
    )*};
}
pod!(
    Lb4Key,
    Lb4Service,
    Lb4Backend,
    Lb4RevNatKey,
    Lb4RevNatValue,
    IpcacheKey,
    IpcacheValue,
    EndpointValue,
    PolicyKey,
    PolicyValue,
    CtKey,
    CtValue,
    Counter,
    DropEvent,
);
