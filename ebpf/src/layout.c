// SPDX-License-Identifier: GPL-2.0-only
/*
 * Never loaded: an object whose BTF describes every type of mesh.h, so the layout
 * test can compare each struct and enum with its Rust mirror (ebpf/src/layout.rs).
 * The loaded objects' map key/value types are checked against the same names.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "mesh.h"

struct mesh_layout_anchor {
	struct mesh_lb4_key lb4_key;
	struct mesh_lb4_service lb4_service;
	struct mesh_lb4_backend lb4_backend;
	struct mesh_lb4_revnat_key lb4_revnat_key;
	struct mesh_lb4_revnat_value lb4_revnat_value;
	struct mesh_ipcache_key ipcache_key;
	struct mesh_ipcache_value ipcache_value;
	struct mesh_endpoint_value endpoint_value;
	struct mesh_policy_key policy_key;
	struct mesh_policy_value policy_value;
	struct mesh_ct_key ct_key;
	struct mesh_ct_value ct_value;
	struct mesh_counter counter;
	struct mesh_drop_event drop_event;
	enum mesh_direction direction;
	enum mesh_policy_action policy_action;
	enum mesh_verdict verdict;
};

struct mesh_layout_anchor mesh_layout_anchor SEC(".data.layout");
