/* A path (struct path: mount + dentry) as text, walked in the kernel where bpf_d_path is
 * not allowed (tracepoints):
 *
 *   len = dpath_walk(&path, &root, buf, &truncated);
 *
 * writes "/a/b/c" into buf[0..len) (without a NUL; "/" for the root), relative to `root`
 * (the task's root: a chrooted or containerised process sees its own paths). Mounts are
 * crossed upwards. At most SEC_PROC_DEPTH components and SEC_PROC_PATH_MAX bytes: a
 * deeper or longer path keeps its last components and sets *truncated.
 *
 * Components are written backwards into the end of a per-CPU scratch area, then copied to
 * the front of `buf` in one read.
 */
#ifndef MEMBRANE_LIB_DPATH_H
#define MEMBRANE_LIB_DPATH_H

#include "abi/security.h"

#define DPATH_NAME_MAX 255
#define DPATH_SCRATCH (2 * SEC_PROC_PATH_MAX)

struct dpath_scratch {
	char buf[DPATH_SCRATCH];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dpath_scratch);
} dpath_scratch SEC(".maps");

static __always_inline struct mount *dpath_real_mount(struct vfsmount *mnt)
{
	return (struct mount *)((char *)mnt - bpf_core_field_offset(struct mount, mnt));
}

static __always_inline __u32 dpath_walk(const struct path *path, const struct path *root,
					char *out, bool *truncated)
{
	struct dentry *dentry = BPF_CORE_READ(path, dentry);
	struct vfsmount *vfsmnt = BPF_CORE_READ(path, mnt);
	struct dentry *root_dentry = BPF_CORE_READ(root, dentry);
	struct vfsmount *root_mnt = BPF_CORE_READ(root, mnt);
	struct mount *mnt = dpath_real_mount(vfsmnt);
	struct dpath_scratch *s;
	__u32 zero = 0, off = SEC_PROC_PATH_MAX, len;
	int i;

	s = bpf_map_lookup_elem(&dpath_scratch, &zero);
	if (!s)
		return 0;
	for (i = 0; i < SEC_PROC_DEPTH; i++) {
		struct dentry *parent, *mnt_root;
		struct qstr name;
		__u32 n;

		if (dentry == root_dentry && vfsmnt == root_mnt)
			break;
		mnt_root = BPF_CORE_READ(vfsmnt, mnt_root);
		parent = BPF_CORE_READ(dentry, d_parent);
		if (dentry == mnt_root || dentry == parent) {
			struct mount *up = BPF_CORE_READ(mnt, mnt_parent);

			if (up == mnt)  /* the global root */
				break;
			dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			vfsmnt = (struct vfsmount *)((char *)up + bpf_core_field_offset(struct mount, mnt));
			continue;
		}
		name = BPF_CORE_READ(dentry, d_name);
		n = name.len;
		if (n > DPATH_NAME_MAX || n + 1 >= off) {  /* off stays >= 1 */
			*truncated = true;
			break;
		}
		off -= n + 1;
		/* off < SEC_PROC_PATH_MAX here; the masks only show the verifier the bounds */
		off &= SEC_PROC_PATH_MAX - 1;
		s->buf[off] = '/';
		bpf_probe_read_kernel(&s->buf[(off + 1) & (DPATH_SCRATCH - 1)], n & DPATH_NAME_MAX,
				      name.name);
		dentry = parent;
	}
	if (i == SEC_PROC_DEPTH)
		*truncated = true;
	if (off == SEC_PROC_PATH_MAX) {
		out[0] = '/';
		return 1;
	}
	len = SEC_PROC_PATH_MAX - off;
	off &= SEC_PROC_PATH_MAX - 1;
	len &= SEC_PROC_PATH_MAX - 1;  /* 2 ..< SEC_PROC_PATH_MAX */
	bpf_probe_read_kernel(out, len, &s->buf[off]);
	return len;
}

#endif
