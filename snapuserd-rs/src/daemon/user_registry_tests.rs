//! The registry's user-space-merge logic against test doubles: mode choice, the merge
//! monitor (FIFO, slot limit), pause/resume, status and percentage, failures, the end of
//! the workers, update verification.

use std::sync::Arc;

use super::control_protocol::Reply;
use super::handlers::{CowFileOpener, HandlerRegistry};
use super::test_support::{
    nowhere, thread_nice, wait_until, FakeUserOpener, FakeUserTarget, PairChannels,
};
use super::update_verify::VerifyDevices;

struct Fixture {
    registry: HandlerRegistry,
    opener: Arc<FakeUserOpener>,
    channels: Arc<PairChannels>,
}

fn fixture(merge_threads: u32) -> Fixture {
    let opener = Arc::new(FakeUserOpener::default());
    let channels = Arc::new(PairChannels::default());
    let registry = HandlerRegistry::new(Box::new(CowFileOpener), Box::new(channels.clone()), 1)
        .with_user_snapshots(Box::new(opener.clone()))
        .with_merge_threads(merge_threads, false)
        .with_verify_devices(VerifyDevices::Dir(nowhere()));
    Fixture {
        registry,
        opener,
        channels,
    }
}

impl Fixture {
    /// `init` (5 fields) and `start` of handler `misc` over the fake COW `cow`; its target.
    fn started(&self, misc: &str, cow: &str) -> Arc<FakeUserTarget> {
        self.registry
            .init_from_command(misc, cow, "src", Some("base"));
        let target = self.opener.get(cow);
        self.registry.start(misc);
        target
    }

    /// [`Fixture::started`], then `initiate_merge`.
    fn merging(&self, misc: &str, cow: &str) -> Arc<FakeUserTarget> {
        let target = self.started(misc, cow);
        self.registry.initiate_merge(misc);
        target
    }
}

fn status(r: &HandlerRegistry, misc: &str) -> String {
    r.status(misc).to_string()
}

#[test]
fn five_field_init_replies_the_base_size_and_zero_fails() {
    let f = fixture(2);
    let r = &f.registry;
    assert_eq!(
        r.init_from_command("sys", "4096:0/10", "src", Some("base")),
        Reply::SuccessSectors(4096)
    );
    assert_eq!(
        r.init_from_command("sys", "4096:0/10", "src", Some("base")),
        Reply::Fail,
        "the name is taken"
    );
    assert_eq!(
        r.init_from_command("empty", "0:0/10", "src", Some("base")),
        Reply::Fail
    );
    assert_eq!(
        r.init_from_command("bad", "garbage", "src", Some("base")),
        Reply::Fail
    );
    assert_eq!(status(r, "sys"), "snapshot");
    assert_eq!(status(r, "unknown"), "snapshot-merge-failed");
}

#[test]
fn a_user_snapshot_daemon_refuses_the_legacy_init() {
    let f = fixture(2);
    let r = f.registry.with_user_snapshot_only(true);
    assert_eq!(r.init("sys", "cow", "src"), Reply::Fail);
    assert!(r.is_empty());
    assert_eq!(
        r.init_from_command("sys", "8:0/1", "src", Some("base")),
        Reply::SuccessSectors(8)
    );
}

#[test]
fn a_registry_without_user_support_refuses_five_fields() {
    let channels = Arc::new(PairChannels::default());
    let r = HandlerRegistry::new(Box::new(CowFileOpener), Box::new(channels), 1);
    assert_eq!(
        r.init_from_command("sys", "8:0/1", "src", Some("base")),
        Reply::Fail
    );
}

#[test]
fn merge_runs_only_when_initiated_and_walks_the_states() {
    let f = fixture(2);
    let r = &f.registry;
    r.init_from_command("sys", "64:0/4", "src", Some("base"));
    let t = f.opener.get("64:0/4");
    assert_eq!(r.initiate_merge("sys"), Reply::Fail, "not started");
    assert_eq!(r.start("sys"), Reply::Success);
    t.grant(2);
    // Nothing merges on its own.
    assert_eq!(t.runs(), 0);
    assert_eq!(t.merged(), 0);
    assert_eq!(status(r, "sys"), "snapshot");
    assert_eq!(r.merge_percent().to_string(), "0.000000");
    assert_eq!(r.initiate_merge("sys"), Reply::Success);
    wait_until(|| t.merged() == 2);
    assert_eq!(status(r, "sys"), "snapshot-merge");
    assert_eq!(r.merge_percent().to_string(), "50.000000");
    assert_eq!(r.initiate_merge("sys"), Reply::Success, "already running");
    t.grant(2);
    wait_until(|| status(r, "sys") == "snapshot-merge-complete");
    assert_eq!(t.runs(), 1);
    assert_eq!(r.merge_percent().to_string(), "100.000000");
    wait_until(|| r.merges_running() == 0);
    assert_eq!(r.delete("sys"), Reply::Success);
    assert_eq!(
        r.merge_percent().to_string(),
        "100.000000",
        "a deleted complete handler counts"
    );
}

#[test]
fn a_complete_header_reports_complete_before_initiate_merge() {
    let f = fixture(2);
    let r = &f.registry;
    r.init_from_command("sys", "64:5/5", "src", Some("base"));
    assert_eq!(status(r, "sys"), "snapshot-merge-complete");
}

#[test]
fn merge_percent_counts_started_handlers_only() {
    let f = fixture(2);
    let r = &f.registry;
    r.init_from_command("a", "64:1/4", "src", Some("base"));
    r.init_from_command("b", "64:3/4", "src", Some("base"));
    assert_eq!(r.merge_percent().to_string(), "0.000000", "none started");
    r.start("a");
    assert_eq!(r.merge_percent().to_string(), "25.000000");
    r.start("b");
    assert_eq!(r.merge_percent().to_string(), "50.000000");
    r.init_from_command("c", "64:2/3", "src", Some("base"));
    r.start("c");
    // (25 + 75 + 66.666...) / 3
    assert_eq!(r.merge_percent().to_string(), "55.555556");
}

#[test]
fn one_slot_runs_merges_first_in_first_out() {
    let f = fixture(1);
    let r = &f.registry;
    let first = f.started("first", "64:0/2");
    let second = f.started("second", "128:0/2");
    assert_eq!(r.initiate_merge("first"), Reply::Success);
    assert_eq!(r.initiate_merge("second"), Reply::Success);
    wait_until(|| first.running());
    second.grant(2);
    assert_eq!(
        status(r, "second"),
        "snapshot-merge",
        "queued counts as merging"
    );
    assert_eq!(second.runs(), 0, "one slot: the second waits");
    assert_eq!(second.merged(), 0);
    first.grant(2);
    wait_until(|| second.merged() == 2);
    assert_eq!(status(r, "first"), "snapshot-merge-complete");
    wait_until(|| status(r, "second") == "snapshot-merge-complete");
    assert_eq!((first.runs(), second.runs()), (1, 1));
}

#[test]
fn pause_holds_running_and_later_merges_resume_releases_them() {
    let f = fixture(2);
    let r = &f.registry;
    let a = f.started("a", "64:0/10");
    let b = f.started("b", "128:0/10");
    r.initiate_merge("a");
    a.grant(3);
    wait_until(|| a.merged() == 3);
    assert_eq!(r.set_merge_paused(true), Reply::Success);
    wait_until(|| a.paused());
    a.grant(5);
    // Started while paused: starts paused.
    r.initiate_merge("b");
    b.grant(5);
    wait_until(|| b.running());
    assert!(b.paused());
    assert_eq!(
        (a.merged(), b.merged()),
        (3, 0),
        "nothing moves while paused"
    );
    assert_eq!((a.permits(), b.permits()), (5, 5));
    assert_eq!(status(r, "a"), "snapshot-merge");
    assert_eq!(r.set_merge_paused(false), Reply::Success);
    wait_until(|| a.merged() == 8 && b.merged() == 5);
    r.shut_down();
    assert!(!a.running() && !b.running(), "shut down stops and joins");
}

#[test]
fn a_failed_merge_reports_failed_and_frees_its_slot() {
    let f = fixture(1);
    let r = &f.registry;
    let bad = f.started("bad", "64:0/4!2");
    let good = f.started("good", "64:0/1");
    r.initiate_merge("bad");
    r.initiate_merge("good");
    bad.grant(4);
    good.grant(1);
    wait_until(|| status(r, "bad") == "snapshot-merge-failed");
    assert_eq!(bad.merged(), 2);
    wait_until(|| status(r, "good") == "snapshot-merge-complete");
    // A new initiate_merge retries (it fails again at the same op here).
    assert_eq!(r.initiate_merge("bad"), Reply::Success);
    wait_until(|| bad.runs() == 2 && !bad.running());
    assert_eq!(status(r, "bad"), "snapshot-merge-failed");
}

#[test]
fn the_end_of_the_workers_stops_the_merge_at_a_safe_point() {
    let f = fixture(2);
    let r = &f.registry;
    let t = f.merging("sys", "64:0/10");
    t.grant(4);
    wait_until(|| t.merged() == 4);
    f.channels.remove_target("sys");
    wait_until(|| r.all_workers_finished());
    wait_until(|| !t.running());
    assert_eq!(r.merges_running(), 0, "the slot is free");
    assert_eq!(status(r, "sys"), "snapshot", "stopped, resumable");
    assert_eq!(t.merged(), 4);
    assert_eq!(r.initiate_merge("sys"), Reply::Fail, "no device to serve");
    // Deleting after the end joins everything.
    assert_eq!(r.delete("sys"), Reply::Success);
    assert!(r.is_empty());
}

#[test]
fn delete_stops_a_running_merge_and_withdraws_a_queued_one() {
    let f = fixture(1);
    let r = &f.registry;
    let a = f.started("a", "64:0/10");
    let b = f.started("b", "128:0/10");
    r.initiate_merge("a");
    r.initiate_merge("b");
    wait_until(|| a.running());
    assert_eq!(r.delete("b"), Reply::Success, "queued: withdrawn");
    assert_eq!(b.runs(), 0);
    assert_eq!(r.delete("a"), Reply::Success, "running: stopped and joined");
    assert!(!a.running());
    assert!(r.is_empty());
}

#[test]
fn update_verify_only_for_the_transitioned_daemons_handlers() {
    let f = fixture(2);
    let r = &f.registry;
    // Over the socket: not verified.
    r.init_from_command("sock", "64:0/2", "src", Some("base"));
    r.start("sock");
    assert_eq!(r.update_verify(), Reply::Fail);
    r.delete("sock");
    // A first-stage name: not verified.
    r.init_user("system_b-init", "64:0/3", "src", "base", true);
    r.start("system_b-init");
    assert_eq!(r.update_verify(), Reply::Fail);
    r.delete("system_b-init");
    // A merge being resumed: not verified.
    r.init_user("vendor_b", "64:1/4", "src", "base", true);
    r.start("vendor_b");
    assert_eq!(r.update_verify(), Reply::Fail);
    r.delete("vendor_b");
    // The transitioned daemon's handler: verified (through the read path here).
    r.init_user("system_b", "64:0/5", "src", "base", true);
    assert_eq!(r.update_verify(), Reply::Fail, "not started");
    r.start("system_b");
    assert_eq!(r.update_verify(), Reply::Success);
}

#[test]
fn legacy_and_user_handlers_live_side_by_side() {
    let f = fixture(2);
    let r = &f.registry;
    r.init_from_command("user", "64:0/2", "src", Some("base"));
    // A legacy 4-field init reaches the legacy opener (which refuses this missing COW).
    assert_eq!(
        r.init_from_command("legacy", "/nonexistent/cow", "/nonexistent/src", None),
        Reply::Fail
    );
    assert_eq!(r.len(), 1);
}

#[test]
fn detach_stops_the_merges_and_the_workers_keep_serving() {
    let f = fixture(2);
    let r = &f.registry;
    let t = f.merging("sys", "64:0/10");
    t.grant(3);
    wait_until(|| t.merged() == 3);
    r.request_stop_merges();
    wait_until(|| !t.running() && r.merges_running() == 0);
    assert_eq!(status(r, "sys"), "snapshot");
    assert!(!r.all_workers_finished(), "the workers still serve");
}

#[test]
fn merges_run_at_background_priority() {
    let f = fixture(2);
    let r = &f.registry;
    let t = f.merging("nicety", "64:0/10");
    t.grant(1);
    // After its first op the thread has lowered its priority.
    wait_until(|| t.merged() == 1);
    assert_eq!(thread_nice("merge-nicety"), Some(10));
    r.shut_down();
}
