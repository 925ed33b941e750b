//! Asking someone outside the daemon to create a ublk device's nodes.
//!
//! Early in boot (the daemon init relaunches after the SELinux transition) no ueventd runs, so
//! the kernel's `ublkc<N>`/`ublkb<N>` nodes appear only when init makes them. A device calls the
//! [`NodeRequestHook`] of its options at the two points where a node becomes due: the character
//! node right after ADD_DEV (or before re-attaching), the block node once the device is started
//! (or recovered). The daemon's hook sends the node's path to init (`-fd_num`,
//! `crate::daemon::init_uevents`).

use std::sync::Arc;

/// Which node of a ublk device is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// The character node `/dev/ublkc<N>`, opened by the serving queues.
    Char,
    /// The block node (`/dev/block/ublkb<N>` on Android), present once the device started.
    Block,
}

impl NodeKind {
    /// The path AOSP's daemon names for this node of device `dev_id` (what init expects).
    pub fn android_path(self, dev_id: u32) -> String {
        match self {
            NodeKind::Char => format!("/dev/ublkc{dev_id}"),
            NodeKind::Block => format!("/dev/block/ublkb{dev_id}"),
        }
    }
}

/// Called with each node that becomes due; it must not fail the device (a node can also
/// appear through ueventd), so it reports its own errors.
#[derive(Clone)]
pub struct NodeRequestHook(Arc<dyn Fn(NodeKind, u32) + Send + Sync>);

impl NodeRequestHook {
    /// A hook calling `f(kind, dev_id)`.
    pub fn new(f: impl Fn(NodeKind, u32) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Announce that node `kind` of device `dev_id` is due.
    pub fn request(&self, kind: NodeKind, dev_id: u32) {
        (self.0)(kind, dev_id);
    }
}

impl std::fmt::Debug for NodeRequestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeRequestHook")
    }
}

impl PartialEq for NodeRequestHook {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for NodeRequestHook {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn paths_are_the_ones_aosp_init_creates() {
        assert_eq!(NodeKind::Char.android_path(0), "/dev/ublkc0");
        assert_eq!(NodeKind::Block.android_path(17), "/dev/block/ublkb17");
    }

    #[test]
    fn a_hook_sees_each_request_and_compares_by_identity() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let hook = NodeRequestHook::new(move |k, id| s.lock().unwrap().push((k, id)));
        hook.request(NodeKind::Char, 3);
        hook.request(NodeKind::Block, 3);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(NodeKind::Char, 3), (NodeKind::Block, 3)]
        );
        assert_eq!(hook, hook.clone());
        assert_ne!(hook, NodeRequestHook::new(|_, _| {}));
    }
}
