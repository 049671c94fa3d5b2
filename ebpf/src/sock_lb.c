// SPDX-License-Identifier: GPL-2.0-only
/*
 * Socket-level load balancing for IPv4 (cgroup sock_addr hooks).
 *
 * connect4 / sendmsg4: a destination VIP:port (+protocol) found in mesh_lb4_svc is
 * rewritten to a backend picked at random from the service's slots; the choice is
 * remembered in mesh_lb4_revnat under (socket cookie, backend) so that
 * recvmsg4 (UDP replies) and getpeername4 hand the VIP:port back to the application.
 * The *6 hooks do the same for IPv4-mapped addresses (::ffff:VIP) on dual-stack
 * AF_INET6 sockets, with the same IPv4 maps.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "mesh.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct mesh_lb4_key);
	__type(value, struct mesh_lb4_service);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_lb4_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct mesh_lb4_backend);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_lb4_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct mesh_lb4_revnat_key);
	__type(value, struct mesh_lb4_revnat_value);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_lb4_revnat SEC(".maps");

/* Outcome of a lookup: not a service (leave the socket alone), a service without a
 * usable backend (refuse), or a backend to use. */
enum lb_result {
	LB_PASS = 0,
	LB_REFUSE = 1,
	LB_TRANSLATE = 2,
};

/* Picks a backend for vip:vport/proto and records the reverse translation for the
 * socket. On LB_TRANSLATE, *addr and *port hold the backend. */
static __always_inline enum lb_result lb4_pick(void *ctx, __u8 proto, __be32 *addr, __be16 *port)
{
	struct mesh_lb4_key key = {};
	struct mesh_lb4_service *svc, *slot;
	struct mesh_lb4_backend *be;
	struct mesh_lb4_revnat_key rkey = {};
	struct mesh_lb4_revnat_value rval = {};
	__u32 backend_id;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return LB_PASS;

	key.address = *addr;
	key.dport = *port;
	key.proto = proto;
	key.backend_slot = 0;
	svc = bpf_map_lookup_elem(&mesh_lb4_svc, &key);
	if (!svc)
		return LB_PASS;
	if (svc->count == 0)
		return LB_REFUSE;

	key.backend_slot = (__u16)(bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&mesh_lb4_svc, &key);
	if (!slot)
		return LB_REFUSE;
	backend_id = slot->backend_id;
	be = bpf_map_lookup_elem(&mesh_lb4_be, &backend_id);
	if (!be)
		return LB_REFUSE;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = be->address;
	rkey.port = be->port;
	rval.address = *addr;
	rval.port = *port;
	/* Without the reverse entry UDP replies would not match the VIP: fail closed. */
	if (bpf_map_update_elem(&mesh_lb4_revnat, &rkey, &rval, BPF_ANY) < 0)
		return LB_REFUSE;

	*addr = be->address;
	*port = be->port;
	return LB_TRANSLATE;
}

/* The VIP:port for a peer this socket was steered to; 0 when there is none. */
static __always_inline int lb4_unpick(void *ctx, __be32 *addr, __be16 *port)
{
	struct mesh_lb4_revnat_key rkey = {};
	struct mesh_lb4_revnat_value *rval;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = *addr;
	rkey.port = *port;
	rval = bpf_map_lookup_elem(&mesh_lb4_revnat, &rkey);
	if (!rval)
		return 0;
	*addr = rval->address;
	*port = rval->port;
	return 1;
}

static __always_inline int lb4_translate(struct bpf_sock_addr *ctx)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;

	switch (lb4_pick(ctx, (__u8)ctx->protocol, &addr, &port)) {
	case LB_REFUSE:
		return 0;
	case LB_TRANSLATE:
		ctx->user_ip4 = addr;
		ctx->user_port = (__u32)port;
		return 1;
	default:
		return 1;
	}
}

static __always_inline void lb4_reverse(struct bpf_sock_addr *ctx)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;

	if (lb4_unpick(ctx, &addr, &port)) {
		ctx->user_ip4 = addr;
		ctx->user_port = (__u32)port;
	}
}

/* IPv4-mapped IPv6 (::ffff:a.b.c.d): what a dual-stack AF_INET6 socket uses to reach
 * an IPv4 service. Translated with the same IPv4 maps; native IPv6 VIPs are not
 * supported yet (no lb6 maps). */
static __always_inline int is_v4_mapped(struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int lb6_translate(struct bpf_sock_addr *ctx)
{
	__be32 addr;
	__be16 port = (__be16)ctx->user_port;

	if (!is_v4_mapped(ctx))
		return 1;
	addr = ctx->user_ip6[3];
	switch (lb4_pick(ctx, (__u8)ctx->protocol, &addr, &port)) {
	case LB_REFUSE:
		return 0;
	case LB_TRANSLATE:
		ctx->user_ip6[3] = addr;
		ctx->user_port = (__u32)port;
		return 1;
	default:
		return 1;
	}
}

static __always_inline void lb6_reverse(struct bpf_sock_addr *ctx)
{
	__be32 addr;
	__be16 port = (__be16)ctx->user_port;

	if (!is_v4_mapped(ctx))
		return;
	addr = ctx->user_ip6[3];
	if (lb4_unpick(ctx, &addr, &port)) {
		ctx->user_ip6[3] = addr;
		ctx->user_port = (__u32)port;
	}
}

SEC("cgroup/connect4")
int mesh_connect4(struct bpf_sock_addr *ctx)
{
	return lb4_translate(ctx);
}

SEC("cgroup/sendmsg4")
int mesh_sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb4_translate(ctx);
}

SEC("cgroup/recvmsg4")
int mesh_recvmsg4(struct bpf_sock_addr *ctx)
{
	lb4_reverse(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int mesh_getpeer4(struct bpf_sock_addr *ctx)
{
	lb4_reverse(ctx);
	return 1;
}

SEC("cgroup/connect6")
int mesh_connect6(struct bpf_sock_addr *ctx)
{
	return lb6_translate(ctx);
}

SEC("cgroup/sendmsg6")
int mesh_sendmsg6(struct bpf_sock_addr *ctx)
{
	return lb6_translate(ctx);
}

SEC("cgroup/recvmsg6")
int mesh_recvmsg6(struct bpf_sock_addr *ctx)
{
	lb6_reverse(ctx);
	return 1;
}

SEC("cgroup/getpeername6")
int mesh_getpeer6(struct bpf_sock_addr *ctx)
{
	lb6_reverse(ctx);
	return 1;
}
