//! Raft group tests over an in-process transport with partition control.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{HardState, Message};

use super::*;

/// Delivers messages between in-process nodes; `cut` drops everything to and from a node.
#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<u64, Weak<RaftNode>>>,
    cut: Mutex<HashSet<u64>>,
}

struct NetTransport {
    net: Arc<Net>,
    from: u64,
}

impl RaftTransport for NetTransport {
    fn send(&self, msgs: Vec<Message>) {
        let cut = self.net.cut.lock().unwrap().clone();
        if cut.contains(&self.from) {
            return;
        }
        let nodes = self.net.nodes.lock().unwrap();
        for m in msgs {
            if cut.contains(&m.to) {
                continue;
            }
            if let Some(n) = nodes.get(&m.to).and_then(Weak::upgrade) {
                n.step(m);
            }
        }
    }
}

fn start(net: &Arc<Net>, id: u64, db: &sled::Db, b: Bootstrap) -> Arc<RaftNode> {
    let t = Arc::new(NetTransport {
        net: net.clone(),
        from: id,
    });
    let n = RaftNode::start(id, db, b, t).unwrap();
    net.nodes.lock().unwrap().insert(id, Arc::downgrade(&n));
    n
}

async fn leader_of(nodes: &[&Arc<RaftNode>]) -> Arc<RaftNode> {
    for _ in 0..300 {
        for n in nodes {
            let s = n.status();
            if s.leader_id == n.id() && s.role == "leader" {
                return (*n).clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader elected within 15 s");
}

fn node(name: &str) -> NodeRecord {
    NodeRecord {
        id: 0,
        name: name.into(),
        admin_addr: String::new(),
        data_addr: String::new(),
        domain: "default".into(),
        zone: "default".into(),
        rack: "default".into(),
        role: NodeRole::Voter,
        pool_size_bytes: 0,
        joined_unix_seconds: 0,
        instance: String::new(),
    }
}

/// Three nodes form a group, survive the loss of the leader, and a restarted node catches
/// up from its persisted log, including across compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commits_survives_leader_loss_and_restarts_from_sled() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let net = Arc::new(Net::default());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let dbs: Vec<sled::Db> = dirs.iter().map(|d| sled::open(d.path()).unwrap()).collect();
    let n1 = start(&net, 1, &dbs[0], Bootstrap::NewCluster);
    leader_of(&[&n1]).await;
    n1.propose(Command::AddNode { node: node("a") })
        .await
        .unwrap();
    let n2 = start(&net, 2, &dbs[1], Bootstrap::Join);
    let n3 = start(&net, 3, &dbs[2], Bootstrap::Join);
    for (id, name) in [(2, "b"), (3, "c")] {
        n1.propose(Command::AddNode { node: node(name) })
            .await
            .unwrap();
        n1.add_member(id, true).await.unwrap();
    }
    // Enough entries to force a compaction on every node.
    let mut idx = 0;
    for i in 0..(raft_node::COMPACT_AFTER_ENTRIES + 50) {
        (_, idx) = n1
            .propose(Command::RaiseAlert {
                unix_seconds: i,
                severity: "info".into(),
                kind: "test".into(),
                resource: "r".into(),
                message: format!("m{i}"),
            })
            .await
            .unwrap();
    }
    n2.wait_applied(idx, Duration::from_secs(20)).await.unwrap();
    n3.wait_applied(idx, Duration::from_secs(20)).await.unwrap();
    assert_eq!(n2.state().nodes.len(), 3);
    let (s1, s3) = (n1.state(), n3.state());
    assert_eq!(
        serde_json::to_string(&*s3).unwrap(),
        serde_json::to_string(&*s1).unwrap(),
        "replicated state machines are identical"
    );
    assert_eq!(s3.alerts.len(), s1.alerts.len());
    assert_eq!(
        (s3.next_node_id, s3.next_alert_id, n3.applied()),
        (s1.next_node_id, s1.next_alert_id, n1.applied())
    );

    // Lose the leader: the other two elect a new one and keep committing.
    net.cut.lock().unwrap().insert(1);
    let l = leader_of(&[&n2, &n3]).await;
    assert_ne!(l.id(), 1);
    l.propose(Command::AddNode { node: node("d") })
        .await
        .unwrap();

    // Restart node 3 from its sled state (log compacted + tail + state machine).
    n3.stop();
    drop(n3);
    net.nodes.lock().unwrap().remove(&3);
    let n3 = start(&net, 3, &dbs[2], Bootstrap::Restart);
    assert!(
        n3.state().nodes.len() >= 3,
        "state machine restored from sled"
    );
    let l = leader_of(&[&n2, &n3]).await;
    let (_, idx) = l
        .propose(Command::AddNode { node: node("e") })
        .await
        .unwrap();
    n3.wait_applied(idx, Duration::from_secs(20)).await.unwrap();
    assert_eq!(n3.state().nodes.len(), 5);

    // Heal: the old leader catches up (by snapshot or log) and agrees.
    net.cut.lock().unwrap().clear();
    n1.wait_applied(idx, Duration::from_secs(30)).await.unwrap();
    assert_eq!(n1.state().nodes, n3.state().nodes);
    // A follower refuses to propose and names the leader.
    let follower = if l.id() == 2 { &n3 } else { &n2 };
    let err = follower
        .propose(Command::AddNode { node: node("x") })
        .await
        .unwrap_err();
    assert!(
        matches!(err, RaftError::NotLeader { leader: Some(_) }),
        "{err}"
    );
}

/// A minority cannot commit: the safety basis for refusing writes on a cut-off site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_cannot_commit() {
    let net = Arc::new(Net::default());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let dbs: Vec<sled::Db> = dirs.iter().map(|d| sled::open(d.path()).unwrap()).collect();
    let n1 = start(&net, 1, &dbs[0], Bootstrap::NewCluster);
    leader_of(&[&n1]).await;
    let n2 = start(&net, 2, &dbs[1], Bootstrap::Join);
    let n3 = start(&net, 3, &dbs[2], Bootstrap::Join);
    n1.add_member(2, true).await.unwrap();
    n1.add_member(3, true).await.unwrap();
    let (_, idx) = n1
        .propose(Command::AddNode { node: node("a") })
        .await
        .unwrap();
    n2.wait_applied(idx, Duration::from_secs(20)).await.unwrap();
    n3.wait_applied(idx, Duration::from_secs(20)).await.unwrap();
    // Cut the leader off alone.
    net.cut.lock().unwrap().extend([2, 3]);
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        n1.propose(Command::AddNode { node: node("z") }),
    )
    .await;
    assert!(
        !matches!(res, Ok(Ok(_))),
        "an isolated leader must not commit"
    );
    assert!(!n1.state().nodes.values().any(|n| n.name == "z"));
    // The isolated leader's majority contact ages (its coordinators' leases run out),
    // while the majority side, once connected, keeps renewing it.
    {
        let mut cut = net.cut.lock().unwrap();
        cut.clear();
        cut.insert(1);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        n1.majority_contact_age() > Duration::from_secs(4),
        "an isolated node must lose its lease: {:?}",
        n1.majority_contact_age()
    );
    let l = leader_of(&[&n2, &n3]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(l.majority_contact_age() < Duration::from_secs(2));
    let follower = if l.id() == 2 { &n3 } else { &n2 };
    assert!(follower.majority_contact_age() < Duration::from_secs(2));
}

/// F9: a crash between saving the applied state machine and saving the HardState that
/// carries the matching commit index left `applied > commit` on disk, and raft-rs refuses
/// to start from that (a panic at every start). The state is written after the HardState
/// now; a store already in that shape starts, with its commit raised to what it applied
/// (entries are applied only once committed), without re-applying anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_applied_state_ahead_of_the_saved_commit_index() {
    let net = Arc::new(Net::default());
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let n1 = start(&net, 1, &db, Bootstrap::NewCluster);
    leader_of(&[&n1]).await;
    let mut idx = 0;
    for name in ["a", "b", "c"] {
        (_, idx) = n1
            .propose(Command::AddNode { node: node(name) })
            .await
            .unwrap();
    }
    let generation_before = n1.state().next_node_id;
    n1.stop();
    drop(n1);
    net.nodes.lock().unwrap().remove(&1);
    // The crash window: the HardState on disk still has an older commit index.
    let meta = db.open_tree("raft_meta").unwrap();
    let mut hs = HardState::parse_from_bytes(&meta.get("hard_state").unwrap().unwrap()).unwrap();
    assert!(hs.commit >= idx);
    hs.commit = idx - 2;
    meta.insert("hard_state", hs.write_to_bytes().unwrap())
        .unwrap();
    db.flush().unwrap();

    let n1 = start(&net, 1, &db, Bootstrap::Restart);
    assert_eq!(n1.applied(), idx, "nothing re-applied, nothing lost");
    assert_eq!(n1.state().next_node_id, generation_before);
    leader_of(&[&n1]).await;
    let (_, next) = n1
        .propose(Command::AddNode { node: node("d") })
        .await
        .unwrap();
    assert!(next > idx);
    assert_eq!(n1.state().nodes.len(), 4);
}

/// Forwards to a leader's handle, after answering "outcome unknown" the first `fail` times
/// (a leader that died with the proposal in flight).
struct FlakyForwarder {
    leader: std::sync::OnceLock<Arc<ClusterHandle>>,
    fail: std::sync::atomic::AtomicU32,
    calls: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl Forwarder for FlakyForwarder {
    async fn forward(
        &self,
        _admin_addr: &str,
        proposal: &Proposal,
    ) -> Result<(Result<ApplyOutput, ApplyError>, u64), ForwardError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.calls.fetch_add(1, SeqCst);
        if self
            .fail
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(ForwardError::Unknown("transport error".into()));
        }
        let leader = self.leader.get().expect("leader handle set");
        leader
            .propose_local(proposal)
            .await
            .map_err(|e| ForwardError::NotDelivered(e.to_string()))
    }
}

/// A domain deactivation submitted while the leader's answer is lost (its site just died)
/// waits for a leader and succeeds; a change that is not idempotent is not sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_change_rides_out_an_unknown_outcome_and_others_do_not() {
    let net = Arc::new(Net::default());
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let dbs: Vec<sled::Db> = dirs.iter().map(|d| sled::open(d.path()).unwrap()).collect();
    let n1 = start(&net, 1, &dbs[0], Bootstrap::NewCluster);
    leader_of(&[&n1]).await;
    let mut a = node("a");
    a.admin_addr = "n1".into();
    a.domain = "east".into();
    n1.propose(Command::AddNode { node: a }).await.unwrap();
    let n2 = start(&net, 2, &dbs[1], Bootstrap::Join);
    let (_, idx) = n1
        .propose(Command::AddNode { node: node("b") })
        .await
        .unwrap();
    n1.add_member(2, true).await.unwrap();
    n2.wait_applied(idx, Duration::from_secs(20)).await.unwrap();
    for _ in 0..200 {
        if n2.status().leader_id == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n2.status().leader_id, 1);
    let flaky = |fail| {
        Arc::new(FlakyForwarder {
            leader: std::sync::OnceLock::new(),
            fail: std::sync::atomic::AtomicU32::new(fail),
            calls: Default::default(),
        })
    };
    let unused = flaky(0);
    let h1 = ClusterHandle::new(n1.clone(), unused);
    let f = flaky(1);
    let _ = f.leader.set(h1.clone());
    let h2 = ClusterHandle::new(n2.clone(), f.clone());
    h2.set_seed_peers(HashMap::from([(1, "n1".to_string())]));
    h2.propose(Command::SetDomainActive {
        domain: "east".into(),
        active: false,
        promote_async: false,
        unix_seconds: 1,
    })
    .await
    .expect("the deactivation waits for a leader and commits");
    assert_eq!(f.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(n2.state().inactive_domains.contains("east"));

    let f = flaky(1);
    let _ = f.leader.set(h1.clone());
    let h2 = ClusterHandle::new(n2.clone(), f.clone());
    h2.set_seed_peers(HashMap::from([(1, "n1".to_string())]));
    let err = h2
        .propose(Command::RaiseAlert {
            unix_seconds: 1,
            severity: "info".into(),
            kind: "k".into(),
            resource: "r".into(),
            message: "m".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::Unavailable(_)), "{err}");
    assert_eq!(
        f.calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "not sent twice"
    );
}
