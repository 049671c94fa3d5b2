// SPDX-License-Identifier: GPL-2.0-only
/*
 * Identity policy on each local endpoint's host-side interface (tc, clsact).
 *
 * Two entry points share one function: mesh_from_ep on the tc INGRESS hook (packets
 * the endpoint sends: its egress) and mesh_to_ep on the tc EGRESS hook (packets
 * delivered to the endpoint: its ingress). A classifier cannot tell which hook it
 * runs on, so the direction is a compile-time constant per entry point.
 *
 * Per packet: endpoint = mesh_endpoints[local address]; remote identity =
 * mesh_ipcache4[remote address] (longest prefix; world when absent); then
 *   1. a tracked flow (mesh_ct4, forward or reversed tuple) passes;
 *   2. a direction the endpoint does not enforce passes and is tracked;
 *   3. otherwise mesh_policy is looked up (identity, then any identity; exact port,
 *      any port, any protocol); allow -> tracked + pass, else drop with a ring-buffer
 *      event. Every verdict is counted per CPU.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "mesh.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct mesh_ipcache_key);
	__type(value, struct mesh_ipcache_value);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_ipcache4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, struct mesh_endpoint_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct mesh_policy_key);
	__type(value, struct mesh_policy_value);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct mesh_ct_key);
	__type(value, struct mesh_ct_value);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_ct4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct mesh_counter);
	__uint(max_entries, MESH_VERDICT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_verdicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_drops SEC(".maps");

static __always_inline int count(struct __sk_buff *skb, __u32 verdict)
{
	struct mesh_counter *c = bpf_map_lookup_elem(&mesh_verdicts, &verdict);

	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	}
	return verdict >= MESH_VERDICT_DROP_POLICY ? TC_ACT_SHOT : TC_ACT_OK;
}

static __always_inline struct mesh_policy_value *
policy_lookup(__u32 endpoint_id, __u32 identity, __be16 dport, __u8 proto, __u8 dir)
{
	struct mesh_policy_key k = {
		.endpoint_id = endpoint_id,
		.identity = identity,
		.dport = dport,
		.proto = proto,
		.direction = dir,
	};
	struct mesh_policy_value *v;

	v = bpf_map_lookup_elem(&mesh_policy, &k);
	if (v)
		return v;
	k.dport = 0;
	v = bpf_map_lookup_elem(&mesh_policy, &k);
	if (v)
		return v;
	k.proto = 0;
	return bpf_map_lookup_elem(&mesh_policy, &k);
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct mesh_endpoint_value *ep;
	struct mesh_ipcache_value *remote;
	struct mesh_policy_value *pol;
	struct mesh_ct_key ct = {}, rct = {};
	struct mesh_ct_value ctv = {};
	struct mesh_ipcache_key ipk = {};
	struct mesh_drop_event *ev;
	__be32 local, peer;
	__be16 sport = 0, dport = 0;
	__u32 remote_identity = MESH_IDENTITY_WORLD;
	__u16 remote_cluster = 0;
	enum mesh_verdict verdict;
	__u16 enforce;

	/* Headers in a non-linear skb: pull Ethernet + the largest IPv4 header + ports
	 * into the linear area (pointers must be reloaded after a pull). */
	{
		__u32 want = sizeof(struct ethhdr) + 60 + 4;

		if (want > skb->len)
			want = skb->len;
		if (data + want > data_end) {
			bpf_skb_pull_data(skb, want);
			data = (void *)(long)skb->data;
			data_end = (void *)(long)skb->data_end;
		}
	}
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return count(skb, MESH_VERDICT_ALLOW_UNMANAGED);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return count(skb, MESH_VERDICT_ALLOW_UNMANAGED);
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return count(skb, MESH_VERDICT_DROP_MALFORMED);

	local = dir == MESH_DIR_EGRESS ? ip->saddr : ip->daddr;
	peer = dir == MESH_DIR_EGRESS ? ip->daddr : ip->saddr;
	ep = bpf_map_lookup_elem(&mesh_endpoints, &local);
	if (!ep)
		return count(skb, MESH_VERDICT_ALLOW_UNMANAGED);
	if (ep->ifindex != 0 && ep->ifindex != skb->ifindex) {
		verdict = MESH_VERDICT_DROP_SPOOF;
		goto drop;
	}

	/* Ports of the first fragment only; later fragments carry none (ports 0). */
	if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) &&
	    !(ip->frag_off & bpf_htons(0x1fff))) {
		__u32 ihl = ip->ihl * 4;
		__be16 *ports;

		if (ihl < sizeof(*ip))
			return count(skb, MESH_VERDICT_DROP_MALFORMED);
		ports = (void *)ip + ihl;
		if ((void *)(ports + 2) > data_end)
			return count(skb, MESH_VERDICT_DROP_MALFORMED);
		sport = ports[0];
		dport = ports[1];
	}

	ipk.prefixlen = 32;
	ipk.address = peer;
	remote = bpf_map_lookup_elem(&mesh_ipcache4, &ipk);
	if (remote) {
		remote_identity = remote->identity;
		remote_cluster = remote->cluster_id;
	}

	ct.saddr = ip->saddr;
	ct.daddr = ip->daddr;
	ct.sport = sport;
	ct.dport = dport;
	ct.proto = ip->protocol;
	ct.direction = dir;
	if (bpf_map_lookup_elem(&mesh_ct4, &ct))
		return count(skb, MESH_VERDICT_ALLOW_CT);
	/* A reply: the reversed tuple was tracked when it went the other way. */
	rct.saddr = ip->daddr;
	rct.daddr = ip->saddr;
	rct.sport = dport;
	rct.dport = sport;
	rct.proto = ip->protocol;
	rct.direction = dir == MESH_DIR_EGRESS ? MESH_DIR_INGRESS : MESH_DIR_EGRESS;
	if (bpf_map_lookup_elem(&mesh_ct4, &rct))
		return count(skb, MESH_VERDICT_ALLOW_CT);

	enforce = dir == MESH_DIR_EGRESS ? MESH_EP_F_ENFORCE_EGRESS : MESH_EP_F_ENFORCE_INGRESS;
	if (!(ep->flags & enforce)) {
		verdict = MESH_VERDICT_ALLOW_UNENFORCED;
	} else {
		pol = policy_lookup(ep->endpoint_id, remote_identity, dport, ip->protocol, dir);
		if (!pol)
			pol = policy_lookup(ep->endpoint_id, 0, dport, ip->protocol, dir);
		if (!pol) {
			verdict = MESH_VERDICT_DROP_POLICY;
			goto drop;
		}
		if (pol->action != MESH_POLICY_ALLOW) {
			verdict = MESH_VERDICT_DROP_DENY;
			goto drop;
		}
		verdict = MESH_VERDICT_ALLOW_POLICY;
	}
	ctv.created_ns = bpf_ktime_get_ns();
	ctv.endpoint_id = ep->endpoint_id;
	bpf_map_update_elem(&mesh_ct4, &ct, &ctv, BPF_NOEXIST);
	return count(skb, verdict);

drop:
	ev = bpf_ringbuf_reserve(&mesh_drops, sizeof(*ev), 0);
	if (ev) {
		__builtin_memset(ev, 0, sizeof(*ev));
		ev->timestamp_ns = bpf_ktime_get_ns();
		ev->saddr = ip->saddr;
		ev->daddr = ip->daddr;
		ev->src_identity = dir == MESH_DIR_EGRESS ? ep->identity : remote_identity;
		ev->dst_identity = dir == MESH_DIR_EGRESS ? remote_identity : ep->identity;
		ev->endpoint_id = ep->endpoint_id;
		ev->ifindex = skb->ifindex;
		ev->sport = sport;
		ev->dport = dport;
		ev->remote_cluster_id = remote_cluster;
		ev->proto = ip->protocol;
		ev->direction = dir;
		ev->reason = (__u8)verdict;
		bpf_ringbuf_submit(ev, 0);
	}
	return count(skb, verdict);
}

SEC("classifier")
int mesh_from_ep(struct __sk_buff *skb)
{
	return handle(skb, MESH_DIR_EGRESS);
}

SEC("classifier")
int mesh_to_ep(struct __sk_buff *skb)
{
	return handle(skb, MESH_DIR_INGRESS);
}
