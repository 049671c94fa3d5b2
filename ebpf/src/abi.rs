//! The map ABI as data: object bytes, program and map names, and every struct's layout.

use crate::layout::*;

/// The socket load-balancing object (`src/sock_lb.c`).
pub static SOCK_LB_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.bpf.o"));
/// The policy object (`src/policy.c`).
pub static POLICY_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy.bpf.o"));
/// Never loaded: its BTF describes every type of `mesh.h` (`src/layout.c`), for the layout test.
pub static LAYOUT_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/layout.bpf.o"));

/// Program names (the C function names), with their sections.
pub mod prog {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "mesh_connect4";
    /// `cgroup/sendmsg4`.
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    /// `cgroup/recvmsg4`.
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    /// `cgroup/getpeername4`.
    pub const GETPEERNAME4: &str = "mesh_getpeer4";
    /// `cgroup/connect6` (IPv4-mapped destinations only).
    pub const CONNECT6: &str = "mesh_connect6";
    /// `cgroup/sendmsg6` (IPv4-mapped destinations only).
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    /// `cgroup/recvmsg6` (IPv4-mapped peers only).
    pub const RECVMSG6: &str = "mesh_recvmsg6";
    /// `cgroup/getpeername6` (IPv4-mapped peers only).
    pub const GETPEERNAME6: &str = "mesh_getpeer6";
    /// Every socket-LB program.
    pub const SOCK_LB: [&str; 8] = [
        CONNECT4,
        SENDMSG4,
        RECVMSG4,
        GETPEERNAME4,
        CONNECT6,
        SENDMSG6,
        RECVMSG6,
        GETPEERNAME6,
    ];
    /// `classifier` on the tc INGRESS hook of an endpoint's host-side interface
    /// (packets the endpoint sends: policy direction egress).
    pub const FROM_ENDPOINT: &str = "mesh_from_ep";
    /// `classifier` on the tc EGRESS hook (packets to the endpoint: direction ingress).
    pub const TO_ENDPOINT: &str = "mesh_to_ep";
}

/// Map names; each map is pinned under this name in the agent's bpffs directory.
pub mod map {
    /// `mesh_lb4_key` → `mesh_lb4_service` (hash).
    pub const LB4_SERVICES: &str = "mesh_lb4_svc";
    /// backend id (`u32`) → `mesh_lb4_backend` (hash).
    pub const LB4_BACKENDS: &str = "mesh_lb4_be";
    /// `mesh_lb4_revnat_key` → `mesh_lb4_revnat_value` (LRU hash).
    pub const LB4_REVNAT: &str = "mesh_lb4_revnat";
    /// `mesh_ipcache_key` → `mesh_ipcache_value` (LPM trie).
    pub const IPCACHE4: &str = "mesh_ipcache4";
    /// endpoint IPv4 (`u32`, network order) → `mesh_endpoint_value` (hash).
    pub const ENDPOINTS: &str = "mesh_endpoints";
    /// `mesh_policy_key` → `mesh_policy_value` (hash).
    pub const POLICY: &str = "mesh_policy";
    /// `mesh_ct_key` → `mesh_ct_value` (LRU hash).
    pub const CT4: &str = "mesh_ct4";
    /// verdict (`u32`) → `mesh_counter` (per-CPU array).
    pub const VERDICTS: &str = "mesh_verdicts";
    /// `mesh_drop_event` records (ring buffer).
    pub const DROPS: &str = "mesh_drops";
}

/// One struct's layout as Rust sees it: the C name, size, and (field, offset, size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructLayout {
    /// The C struct name in `mesh.h`.
    pub c_name: &'static str,
    /// `size_of` the Rust type.
    pub size: usize,
    /// Fields in declaration order: (name, `offset_of!`, size).
    pub fields: Vec<(&'static str, usize, usize)>,
}

macro_rules! layout {
    ($t:ty, $c:literal, [$($f:ident),* $(,)?]) => {
        StructLayout {
            c_name: $c,
            size: size_of::<$t>(),
            fields: vec![$((
                stringify!($f),
                core::mem::offset_of!($t, $f),
                {
                    let v = <$t>::default();
                    size_of_val(&v.$f)
                },
            )),*],
        }
    };
}

/// Every Rust mirror of a `mesh.h` struct.
pub fn struct_layouts() -> Vec<StructLayout> {
    vec![
        layout!(
            Lb4Key,
            "mesh_lb4_key",
            [address, dport, backend_slot, proto, pad]
        ),
        layout!(Lb4Service, "mesh_lb4_service", [backend_id, count, flags]),
        layout!(
            Lb4Backend,
            "mesh_lb4_backend",
            [address, port, proto, flags]
        ),
        layout!(
            Lb4RevNatKey,
            "mesh_lb4_revnat_key",
            [cookie, address, port, pad]
        ),
        layout!(
            Lb4RevNatValue,
            "mesh_lb4_revnat_value",
            [address, port, pad]
        ),
        layout!(IpcacheKey, "mesh_ipcache_key", [prefixlen, address]),
        layout!(
            IpcacheValue,
            "mesh_ipcache_value",
            [identity, cluster_id, flags]
        ),
        layout!(
            EndpointValue,
            "mesh_endpoint_value",
            [endpoint_id, identity, ifindex, flags, pad]
        ),
        layout!(
            PolicyKey,
            "mesh_policy_key",
            [endpoint_id, identity, dport, proto, direction]
        ),
        layout!(PolicyValue, "mesh_policy_value", [action, pad, rule_id]),
        layout!(
            CtKey,
            "mesh_ct_key",
            [saddr, daddr, sport, dport, proto, direction, pad]
        ),
        layout!(CtValue, "mesh_ct_value", [created_ns, endpoint_id, pad]),
        layout!(Counter, "mesh_counter", [packets, bytes]),
        layout!(
            DropEvent,
            "mesh_drop_event",
            [
                timestamp_ns,
                saddr,
                daddr,
                src_identity,
                dst_identity,
                endpoint_id,
                ifindex,
                sport,
                dport,
                remote_cluster_id,
                proto,
                direction,
                reason,
                pad
            ]
        ),
    ]
}

/// Every C enum of `mesh.h` with its Rust constants: (enum name, [(enumerator, value)]).
pub fn enum_values() -> Vec<(&'static str, Vec<(&'static str, u32)>)> {
    vec![
        (
            "mesh_direction",
            vec![
                ("MESH_DIR_INGRESS", u32::from(direction::INGRESS)),
                ("MESH_DIR_EGRESS", u32::from(direction::EGRESS)),
            ],
        ),
        (
            "mesh_policy_action",
            vec![
                ("MESH_POLICY_ALLOW", u32::from(action::ALLOW)),
                ("MESH_POLICY_DENY", u32::from(action::DENY)),
            ],
        ),
        ("mesh_verdict", verdict::ALL.to_vec()),
    ]
}

/// One map as the agent uses it: the C type names of key and value (struct names, or
/// the typedef the C map definition names) and the Rust sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapAbi {
    /// Map name.
    pub name: &'static str,
    /// Which object defines it: `"sock_lb"` or `"policy"`.
    pub object: &'static str,
    /// (C key type name, Rust key size); `None` for the ring buffer.
    pub key: Option<(&'static str, usize)>,
    /// (C value type name, Rust value size); `None` for the ring buffer.
    pub value: Option<(&'static str, usize)>,
}

/// Every map of both objects with the Rust key/value types the agent uses.
pub fn map_abis() -> Vec<MapAbi> {
    fn m(
        name: &'static str,
        object: &'static str,
        key: (&'static str, usize),
        value: (&'static str, usize),
    ) -> MapAbi {
        MapAbi {
            name,
            object,
            key: Some(key),
            value: Some(value),
        }
    }
    vec![
        m(
            map::LB4_SERVICES,
            "sock_lb",
            ("mesh_lb4_key", size_of::<Lb4Key>()),
            ("mesh_lb4_service", size_of::<Lb4Service>()),
        ),
        m(
            map::LB4_BACKENDS,
            "sock_lb",
            ("__u32", size_of::<u32>()),
            ("mesh_lb4_backend", size_of::<Lb4Backend>()),
        ),
        m(
            map::LB4_REVNAT,
            "sock_lb",
            ("mesh_lb4_revnat_key", size_of::<Lb4RevNatKey>()),
            ("mesh_lb4_revnat_value", size_of::<Lb4RevNatValue>()),
        ),
        m(
            map::IPCACHE4,
            "policy",
            ("mesh_ipcache_key", size_of::<IpcacheKey>()),
            ("mesh_ipcache_value", size_of::<IpcacheValue>()),
        ),
        m(
            map::ENDPOINTS,
            "policy",
            ("__be32", size_of::<u32>()),
            ("mesh_endpoint_value", size_of::<EndpointValue>()),
        ),
        m(
            map::POLICY,
            "policy",
            ("mesh_policy_key", size_of::<PolicyKey>()),
            ("mesh_policy_value", size_of::<PolicyValue>()),
        ),
        m(
            map::CT4,
            "policy",
            ("mesh_ct_key", size_of::<CtKey>()),
            ("mesh_ct_value", size_of::<CtValue>()),
        ),
        m(
            map::VERDICTS,
            "policy",
            ("__u32", size_of::<u32>()),
            ("mesh_counter", size_of::<Counter>()),
        ),
        MapAbi {
            name: map::DROPS,
            object: "policy",
            key: None,
            value: None,
        },
    ]
}
