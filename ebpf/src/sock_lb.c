// SPDX-License-Identifier: GPL-2.0-only
/*
 * Socket-level load balancing for IPv4 (cgroup sock_addr hooks).
 *
 * connect4 / sendmsg4: a destination VIP:port (+protocol) found in mesh_lb4_svc is
 * rewritten to a backend picked at random from the service's slots; the choice is
 * remembered in mesh_lb4_revnat under (socket cookie, backend) so that
 * recvmsg4 (UDP replies) and getpeername4 hand the VIP:port back to the application.
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

/* The socket's protocol; sock_addr programs see SOCK_STREAM/SOCK_DGRAM sockets. */
static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	return (__u8)ctx->protocol;
}

/* Translates ctx->user_ip4:user_port if it is a service. Returns 0 when the
 * service exists but has no backend (the caller refuses the connect). */
static __always_inline int lb4_translate(struct bpf_sock_addr *ctx)
{
	struct mesh_lb4_key key = {};
	struct mesh_lb4_service *svc, *slot;
	struct mesh_lb4_backend *be;
	struct mesh_lb4_revnat_key rkey = {};
	struct mesh_lb4_revnat_value rval = {};
	__u32 backend_id;
	__be32 vip = ctx->user_ip4;
	__be16 vport = (__be16)ctx->user_port;
	__u8 proto = sock_proto(ctx);

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;

	key.address = vip;
	key.dport = vport;
	key.proto = proto;
	key.backend_slot = 0;
	svc = bpf_map_lookup_elem(&mesh_lb4_svc, &key);
	if (!svc)
		return 1;
	if (svc->count == 0)
		return 0;

	key.backend_slot = (__u16)(bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&mesh_lb4_svc, &key);
	if (!slot)
		return 0;
	backend_id = slot->backend_id;
	be = bpf_map_lookup_elem(&mesh_lb4_be, &backend_id);
	if (!be)
		return 0;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = be->address;
	rkey.port = be->port;
	rval.address = vip;
	rval.port = vport;
	/* Without the reverse entry UDP replies would not match the VIP: fail closed. */
	if (bpf_map_update_elem(&mesh_lb4_revnat, &rkey, &rval, BPF_ANY) < 0)
		return 0;

	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	return 1;
}

/* Restores the VIP:port when the peer is a backend this socket was steered to. */
static __always_inline void lb4_reverse(struct bpf_sock_addr *ctx)
{
	struct mesh_lb4_revnat_key rkey = {};
	struct mesh_lb4_revnat_value *rval;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = ctx->user_ip4;
	rkey.port = (__be16)ctx->user_port;
	rval = bpf_map_lookup_elem(&mesh_lb4_revnat, &rkey);
	if (!rval)
		return;
	ctx->user_ip4 = rval->address;
	ctx->user_port = (__u32)rval->port;
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
