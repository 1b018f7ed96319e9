//! The decision fence against a real etcd (started by the harness): a decider's write needs its
//! leadership token and the decision's expected revision; operators' compare-and-swap writes
//! win races cleanly; a deposed decider can never overwrite a newer decision.
#![forbid(unsafe_code)]

use std::time::Duration;

use chrono::Utc;
use gsb_fleet::{Cas, Confirm, CoordinationConfig, DeciderStatus, Fleet};
use gsb_tests::etcd::EtcdCluster;
use gsb_tests::wait_until;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn status(name: &str) -> DeciderStatus {
    DeciderStatus {
        name: name.into(),
        region: String::new(),
        since: Utc::now(),
        confirmed_at: Utc::now(),
    }
}

async fn member(
    etcd: &EtcdCluster,
    name: &str,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Fleet {
    let mut c = CoordinationConfig::new(etcd.endpoints());
    c.lease_ttl = Duration::from_secs(2);
    let f = Fleet::start(&c, name.into(), tracker, stop.clone()).unwrap();
    let mut view = f.view();
    tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| v.up))
        .await
        .expect("session within 10s")
        .unwrap();
    f
}

#[tokio::test]
async fn the_fence_refuses_a_deposed_decider_and_a_stale_revision() {
    let etcd = EtcdCluster::start(1).await;
    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    let a = member(&etcd, "a", &tracker, &stop).await;
    let b = member(&etcd, "b", &tracker, &stop).await;

    let ta = a
        .campaign(&status("a"))
        .await
        .unwrap()
        .expect("a wins an empty election");
    assert_eq!(
        b.campaign(&status("b")).await.unwrap(),
        None,
        "one decider at a time"
    );

    // The first decision: expected revision 0 (no key yet).
    let Confirm::Confirmed { written: Some(r1) } = a
        .confirm(ta, &status("a"), Some((0, b"one".to_vec())))
        .await
        .unwrap()
    else {
        panic!("the decider's first write goes through");
    };
    // A confirmation without a write keeps the decision.
    assert_eq!(
        a.confirm(ta, &status("a"), None).await.unwrap(),
        Confirm::Confirmed { written: None }
    );
    // An operator's command through b: compare-and-swap on r1.
    let Cas::Written(r2) = b.cas_decision(r1, b"two".to_vec()).await.unwrap() else {
        panic!("cas on the current revision is written");
    };
    assert!(r2 > r1);
    // Another CAS on the old revision loses and learns the current value.
    match b.cas_decision(r1, b"late".to_vec()).await.unwrap() {
        Cas::Conflict(Some(now)) => assert_eq!(now.value, b"two"),
        other => panic!("stale cas must conflict: {other:?}"),
    }
    // The decider writing on top of r1 is fenced by the revision (leadership still held).
    match a
        .confirm(ta, &status("a"), Some((r1, b"three".to_vec())))
        .await
        .unwrap()
    {
        Confirm::Fenced {
            lost_leadership: false,
            decision: Some(d),
            ..
        } => {
            assert_eq!(d.value, b"two");
            assert_eq!(d.mod_revision, r2);
        }
        other => panic!("revision fence: {other:?}"),
    }

    // a's leadership ends (as its lease would); b is elected.
    let out = etcd.etcdctl(&["del", "/gsb/decider"]);
    assert!(out.status.success(), "{out:?}");
    let tb = b
        .campaign(&status("b"))
        .await
        .unwrap()
        .expect("b wins the free election");
    assert_ne!(ta, tb);
    // The deposed decider's write, even on the current revision, is refused.
    match a
        .confirm(ta, &status("a"), Some((r2, b"zombie".to_vec())))
        .await
        .unwrap()
    {
        Confirm::Fenced {
            lost_leadership: true,
            decider: Some(d),
            decision: Some(now),
        } => {
            assert_eq!(d.create_revision, tb);
            assert_eq!(now.value, b"two", "the newer decision stands");
        }
        other => panic!("leadership fence: {other:?}"),
    }
    // Both members' views converge on the same decision.
    for f in [&a, &b] {
        let mut view = f.view();
        wait_until(Duration::from_secs(5), "the view shows r2", || {
            let ok = view.borrow_and_update().decision_revision() == r2;
            async move { ok }
        })
        .await;
    }
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn a_dead_members_vote_and_leadership_go_with_its_lease() {
    let etcd = EtcdCluster::start(1).await;
    let tracker = TaskTracker::new();
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let a = member(&etcd, "a", &tracker, &stop_a).await;
    let b = member(&etcd, "b", &tracker, &stop_b).await;
    let vote = gsb_fleet::Vote {
        name: "a".into(),
        region: "east".into(),
        seen_at: Utc::now(),
        sites: Default::default(),
        applied_revision: 0,
        ready: true,
        unready_reason: None,
    };
    a.publish_vote(&vote).await.unwrap();
    a.campaign(&status("a")).await.unwrap().expect("a decides");
    let mut view = b.view();
    wait_until(
        Duration::from_secs(5),
        "b sees a's vote and leadership",
        || {
            let v = view.borrow_and_update();
            let ok = v.members.contains_key("a") && v.decider.is_some();
            async move { ok }
        },
    )
    .await;
    // a stops: its lease is revoked, so its keys vanish at once.
    stop_a.cancel();
    wait_until(Duration::from_secs(5), "a's keys gone", || {
        let v = view.borrow_and_update();
        let ok = !v.members.contains_key("a") && v.decider.is_none();
        async move { ok }
    })
    .await;
    assert!(b.campaign(&status("b")).await.unwrap().is_some());
    stop_b.cancel();
    tracker.close();
    tracker.wait().await;
}
