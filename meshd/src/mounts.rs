//! Mount points from `/proc/mounts`: where cgroup2 and bpffs are, and whether a path is on one.

use std::path::{Path, PathBuf};

/// `(mount point, fs type)` of every mount, in `/proc/mounts` order (empty if unreadable).
fn mounts() -> Vec<(PathBuf, String)> {
    std::fs::read_to_string("/proc/mounts")
        .map(|text| {
            text.lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
                    Some((PathBuf::from(dir), fstype.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The first mount point of file-system type `fstype` (e.g. `cgroup2`: `/sys/fs/cgroup` on
/// unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn mount_point(fstype: &str) -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find_map(|(dir, t)| (t == fstype).then_some(dir))
}

/// Whether `path` is (or would be created) on a mount of type `fstype`: the longest mount
/// point that is a prefix of `path` has that type.
pub fn is_on(path: &Path, fstype: &str) -> bool {
    mounts()
        .into_iter()
        .filter(|(dir, _)| path.starts_with(dir))
        .max_by_key(|(dir, _)| dir.as_os_str().len())
        .is_some_and(|(_, t)| t == fstype)
}

/// Whether `path` itself is a mount point of type `fstype`.
pub fn is_mount_point(path: &Path, fstype: &str) -> bool {
    mounts()
        .into_iter()
        .any(|(dir, t)| dir == path && t == fstype)
}
