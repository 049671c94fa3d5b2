/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * meshd map ABI: every BPF map key and value, once. Mirrored by exactly one
 * #[repr(C)] Rust definition in ebpf/src/layout.rs; the layout test
 * (ebpf/tests/layout.rs) compares both against the BTF of the compiled object.
 *
 * Byte order: every address and port below is in NETWORK byte order, exactly as
 * the packet / socket carries it. Identities, ids, counts and flags are host order.
 * Explicit padding fields, no bool, no implicit holes.
 */
#ifndef MESH_H
#define MESH_H

#include <linux/types.h>

/* ---- socket load balancing (cgroup/connect4, sendmsg4, recvmsg4, getpeername4) ---- */

/* Service map key, a la Cilium lb4_key: slot 0 is the master entry of a service
 * (its value carries the backend count), slots 1..=count name one backend each. */
struct mesh_lb4_key {
	__be32 address;       /* ClusterIP or ClusterSetIP */
	__be16 dport;         /* service port */
	__u16 backend_slot;   /* 0 = master entry */
	__u8 proto;           /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 pad[3];
};

struct mesh_lb4_service {
	__u32 backend_id;     /* slot > 0: the backend; slot 0: 0 */
	__u16 count;          /* slot 0: number of backend slots; slot > 0: 0 */
	__u16 flags;          /* reserved, 0 */
};

/* Backend map value (key: __u32 backend id, never 0). */
struct mesh_lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;           /* reserved, 0 */
};

/* Reverse NAT, keyed by socket cookie + the backend the socket was sent to. */
struct mesh_lb4_revnat_key {
	__u64 cookie;
	__be32 address;       /* backend address */
	__be16 port;          /* backend port */
	__u16 pad;
};

struct mesh_lb4_revnat_value {
	__be32 address;       /* the VIP the application asked for */
	__be16 port;          /* the service port */
	__u16 pad;
};

/* ---- identity policy (tc classifier on each endpoint's host-side interface) ---- */

/* ipcache: LPM trie key (prefixlen counts the bits of `address`). */
struct mesh_ipcache_key {
	__u32 prefixlen;
	__be32 address;
};

struct mesh_ipcache_value {
	__u32 identity;
	__u16 cluster_id;
	__u16 flags;          /* reserved, 0 */
};

/* Local endpoints, keyed by the endpoint's IPv4 address (__be32). */
struct mesh_endpoint_value {
	__u32 endpoint_id;
	__u32 identity;
	__u32 ifindex;        /* host-side interface; 0 = do not check */
	__u16 flags;          /* MESH_EP_F_* */
	__u16 pad;
};

#define MESH_EP_F_ENFORCE_INGRESS 0x1 /* default-deny traffic to the endpoint */
#define MESH_EP_F_ENFORCE_EGRESS 0x2  /* default-deny traffic from the endpoint */

/* Direction, always from the endpoint's point of view. */
enum mesh_direction {
	MESH_DIR_INGRESS = 0, /* to the endpoint: tc EGRESS hook of the host-side veth */
	MESH_DIR_EGRESS = 1,  /* from the endpoint: tc INGRESS hook of the host-side veth */
};

/* Policy key. identity 0 = any identity, dport 0 = any port, proto 0 = any protocol. */
struct mesh_policy_key {
	__u32 endpoint_id;
	__u32 identity;       /* the remote peer's identity */
	__be16 dport;         /* destination port of the flow's first packet */
	__u8 proto;
	__u8 direction;       /* enum mesh_direction */
};

enum mesh_policy_action {
	MESH_POLICY_ALLOW = 1,
	MESH_POLICY_DENY = 2,
};

struct mesh_policy_value {
	__u8 action;          /* enum mesh_policy_action */
	__u8 pad[3];
	__u32 rule_id;        /* opaque to the datapath; for observability */
};

/* Connection table (LRU): one entry per allowed flow, keyed by the tuple of its
 * first packet and the direction in which it was checked. */
struct mesh_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 direction;       /* enum mesh_direction of the first packet */
	__u16 pad;
};

struct mesh_ct_value {
	__u64 created_ns;     /* bpf_ktime_get_ns() */
	__u32 endpoint_id;
	__u32 pad;
};

/* Per-CPU counters, one array slot per verdict. */
enum mesh_verdict {
	MESH_VERDICT_ALLOW_POLICY = 0,     /* new flow allowed by a policy entry */
	MESH_VERDICT_ALLOW_CT = 1,         /* packet of a tracked flow (either way) */
	MESH_VERDICT_ALLOW_UNENFORCED = 2, /* endpoint has no policy in this direction */
	MESH_VERDICT_ALLOW_UNMANAGED = 3,  /* not an IPv4 packet of a known endpoint */
	MESH_VERDICT_DROP_POLICY = 4,      /* no matching allow entry (default deny) */
	MESH_VERDICT_DROP_DENY = 5,        /* an explicit deny entry */
	MESH_VERDICT_DROP_SPOOF = 6,       /* endpoint address on the wrong interface */
	MESH_VERDICT_DROP_MALFORMED = 7,   /* truncated IPv4 / L4 header */
	MESH_VERDICT_MAX = 8,
};

struct mesh_counter {
	__u64 packets;
	__u64 bytes;
};

/* Ring buffer record, one per dropped packet. */
struct mesh_drop_event {
	__u64 timestamp_ns;
	__be32 saddr;
	__be32 daddr;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 endpoint_id;
	__u32 ifindex;
	__be16 sport;
	__be16 dport;
	__u16 remote_cluster_id;
	__u8 proto;
	__u8 direction;       /* enum mesh_direction */
	__u8 reason;          /* enum mesh_verdict (a DROP_*) */
	__u8 pad[7];
};

/* Reserved identities (DESIGN §3). */
#define MESH_IDENTITY_WORLD 2

#endif /* MESH_H */
