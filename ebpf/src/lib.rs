//! mesh-ebpf: the meshd datapath programs (C) and their map ABI (Rust mirror).
//!
//! ```text
//!  src/mesh.h ── one C definition of every map key/value ──┐
//!  src/sock_lb.c  cgroup/connect4, sendmsg4, recvmsg4, getpeername4   │  build.rs: clang -O2 -g
//!  src/policy.c   classifier mesh_from_ep / mesh_to_ep (tc, clsact)   ├─ -target bpf → OUT_DIR
//!  src/layout.c   BTF anchor of every mesh.h type (never loaded)      ┘  (embedded, 8-aligned)
//!        │
//!        ▼
//!  abi::{SOCK_LB_OBJ, POLICY_OBJ} + layout::* (#[repr(C)] mirrors, aya::Pod)
//!        │   tests/layout.rs parses the objects' BTF and proves C and Rust agree
//!        ▼
//!  mesh-agent datapath (aya): loads both objects with maps pinned by name under the
//!  agent's bpffs dir, attaches the cgroup programs and the tc programs, writes maps.
//! ```
//!
//! **Socket LB.** `mesh_lb4_svc` is keyed by (VIP, port, proto, slot) as Cilium's
//! `lb4_service`: slot 0 is the master entry with the backend count, slots `1..=count`
//! name backend ids in `mesh_lb4_be`. connect4/sendmsg4 pick a slot at random and
//! rewrite the destination; the choice is remembered in the LRU `mesh_lb4_revnat` keyed
//! by (socket cookie, backend) so recvmsg4 (UDP replies) and getpeername4 report the
//! VIP:port. A service with a master entry but 0 backends refuses the connect (EPERM).
//! The `*6` hooks do the same for IPv4-mapped destinations (`::ffff:VIP`) of dual-stack
//! `AF_INET6` sockets, with the same IPv4 maps; native IPv6 services have no maps yet.
//!
//! **Policy.** The tc programs run on each local endpoint's host-side veth. Directions
//! are the endpoint's: the tc *ingress* hook sees what the endpoint sends (its egress,
//! `mesh_from_ep`), the tc *egress* hook what it receives (its ingress, `mesh_to_ep`).
//! The endpoint is found by its IPv4 address (`mesh_endpoints`: saddr at `from_ep`,
//! daddr at `to_ep`), so one program serves every endpoint and the syncer needs only
//! the view's addresses; the value's `ifindex`, when set, must match the interface
//! (a pod cannot claim a neighbour's address). The remote identity comes from the
//! `mesh_ipcache4` LPM trie (world when absent). `mesh_policy` is looked up by
//! (endpoint id, identity, dport, proto, direction), then dport 0, then proto 0, then
//! the same with identity 0 (any).
//!
//! **Replies.** A minimal connection table, `mesh_ct4` (LRU hash): when a packet without
//! a tracked flow is allowed (by policy, or because its direction is not enforced), its
//! tuple is recorded *with the direction it was checked in*. A later packet passes if its
//! own tuple+direction is tracked (same flow) or its reversed tuple with the opposite
//! direction is (a reply). The direction in the key keeps two local endpoints apart: a
//! flow A→B tracked at A's egress does not let it skip B's ingress check. Chosen over a
//! flag-based (TCP ACK) approach because it also covers UDP and ICMP and cannot be
//! forged by setting flags. Limits: no TCP state machine or timeouts (entries live until
//! LRU eviction), and a revoked policy does not cut flows already tracked.
//!
//! Not covered by the policy program: IPv6 packets (they pass as `ALLOW_UNMANAGED`;
//! endpoints are known by their IPv4 address only).
//!
//! Byte order: addresses and ports in every key and value are network order (the raw
//! fields hold them as-is; constructors take host values). Identities, ids, counts and
//! flags are host order.

pub mod abi;
pub mod layout;

pub use abi::{POLICY_OBJ, SOCK_LB_OBJ, map, prog};
pub use layout::*;
