//! The raft group: one `RawNode` driven by a dedicated thread, its log and state persisted
//! in sled.
//!
//! Persistence (sled trees under the node's metadata database):
//! * `raft_log`: entries by index (big-endian key), protobuf-encoded.
//! * `raft_meta`: `hard_state`, `conf_state`, `compacted` (index and term of the last
//!   compacted entry), `applied` (applied index) and `state` (the state machine as JSON at
//!   `applied`).
//!
//! Every ready batch is written and `flush`ed (fsync) before the messages that depend on it
//! are sent and before `advance`, as raft requires. The state machine and the applied index
//! are written together in one sled batch, so after a restart the state is exactly the
//! state at `applied` and raft re-delivers the entries after it.
//!
//! Log compaction: once more than [`COMPACT_AFTER_ENTRIES`] entries are applied beyond the
//! first index, the log is compacted up to the applied index. Followers that fall behind get
//! a snapshot built from the current state machine.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, Snapshot,
};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole, Storage};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::state::{ApplyError, ApplyOutput, ClusterState, Command};

/// Raft tick interval. With the election and heartbeat ticks below: heartbeats every
/// 300 ms, elections after 3 to 6 s of silence (raft randomizes in [10, 20) ticks), which
/// rides out a stalled fsync on a busy disk without flapping.
pub const TICK: Duration = Duration::from_millis(100);
pub const ELECTION_TICKS: usize = 30;
pub const HEARTBEAT_TICKS: usize = 3;
/// Compact the log when this many applied entries sit above its first index.
pub const COMPACT_AFTER_ENTRIES: u64 = 1000;
/// How long a proposal may wait to be applied.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Outbound raft messages queued for the transport; raft retries what is dropped.
pub const TRANSPORT_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("this node is not the raft leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(
        "the proposal was not committed within {0:?}: the cluster may have lost its raft majority"
    )]
    Timeout(Duration),
    #[error("the raft thread has stopped")]
    Stopped,
    #[error("raft storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
}

/// Sends raft messages to peers. Implemented by the node's gRPC transport.
pub trait RaftTransport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
}

/// What the status of the raft group looks like from this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub role: String,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Peers the leader heard from within the last election timeout (leader only; on a
    /// follower, just the leader).
    pub active: Vec<u64>,
    /// Peers known but not recently heard from (leader only).
    pub inactive: Vec<u64>,
}

/// A committed proposal's envelope: who proposed it, so the proposer can be told the result.
#[derive(Serialize, Deserialize)]
struct Envelope {
    proposer: u64,
    seq: u64,
    cmd: Option<Command>,
}

type Reply = oneshot::Sender<Result<(ApplyOutput, u64), RaftError>>;

enum Msg {
    Propose(Command, Reply),
    AddMember(u64, bool, Reply),
    RemoveMember(u64, Reply),
    Step(Box<Message>),
    Campaign,
    Stop,
}

/// Handle to the raft thread.
pub struct RaftNode {
    id: u64,
    /// When this node last knew it was in contact with a raft majority, in milliseconds
    /// since `epoch` (see [`RaftNode::majority_contact_age`]).
    contact_ms: Arc<std::sync::atomic::AtomicU64>,
    epoch: Instant,
    tx: std::sync::Mutex<Sender<Msg>>,
    state: Arc<RwLock<Arc<ClusterState>>>,
    status: Arc<RwLock<RaftStatus>>,
    applied_rx: watch::Receiver<u64>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// sled-backed persistence of the raft log and state.
struct Persist {
    log: sled::Tree,
    meta: sled::Tree,
    db: sled::Db,
}

fn pb_err<E: std::fmt::Display>(e: E) -> RaftError {
    RaftError::Storage(e.to_string())
}

impl Persist {
    fn put_pb<M: protobuf::Message>(&self, key: &str, m: &M) -> Result<(), RaftError> {
        let b = m.write_to_bytes().map_err(pb_err)?;
        self.meta.insert(key, b).map_err(pb_err)?;
        Ok(())
    }

    fn get_pb<M: protobuf::Message>(&self, key: &str) -> Result<Option<M>, RaftError> {
        match self.meta.get(key).map_err(pb_err)? {
            Some(b) => Ok(Some(M::parse_from_bytes(&b).map_err(pb_err)?)),
            None => Ok(None),
        }
    }

    fn append(&self, ents: &[Entry]) -> Result<(), RaftError> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        // Entries at and after the first new index are replaced.
        let stale: Vec<_> = self
            .log
            .range(first.index.to_be_bytes()..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(pb_err)?;
        let mut batch = sled::Batch::default();
        for k in stale {
            batch.remove(k);
        }
        for e in ents {
            batch.insert(&e.index.to_be_bytes(), e.write_to_bytes().map_err(pb_err)?);
        }
        self.log.apply_batch(batch).map_err(pb_err)
    }

    fn save_state(&self, applied: u64, state: &ClusterState) -> Result<(), RaftError> {
        let mut batch = sled::Batch::default();
        batch.insert("applied", &applied.to_be_bytes());
        batch.insert("state", serde_json::to_vec(state).map_err(pb_err)?);
        self.meta.apply_batch(batch).map_err(pb_err)
    }

    fn flush(&self) -> Result<(), RaftError> {
        self.db.flush().map(|_| ()).map_err(pb_err)
    }

    /// A received snapshot, atomically: the log is emptied, and the compaction point, the
    /// configuration, the HardState and the state machine are replaced.
    fn install_snapshot(
        &self,
        meta: &raft::eraftpb::SnapshotMetadata,
        hs: &HardState,
        applied: u64,
        state: &ClusterState,
    ) -> Result<(), RaftError> {
        use sled::Transactional;
        let keys: Vec<sled::IVec> = self
            .log
            .iter()
            .keys()
            .collect::<Result<_, _>>()
            .map_err(pb_err)?;
        let mut compacted = meta.clone();
        compacted.clear_conf_state();
        let compacted = compacted.write_to_bytes().map_err(pb_err)?;
        let conf = meta.get_conf_state().write_to_bytes().map_err(pb_err)?;
        let hs = hs.write_to_bytes().map_err(pb_err)?;
        let st = serde_json::to_vec(state).map_err(pb_err)?;
        (&self.log, &self.meta)
            .transaction(|(log, m)| {
                for k in &keys {
                    log.remove(k)?;
                }
                m.insert("compacted", compacted.clone())?;
                m.insert("conf_state", conf.clone())?;
                m.insert("hard_state", hs.clone())?;
                m.insert("applied", &applied.to_be_bytes())?;
                m.insert("state", st.clone())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| RaftError::Storage(format!("snapshot install: {e:?}")))
    }
}

/// The Storage raft reads: entries and hard state from a `MemStorage` mirror of sled,
/// snapshots built from the live state machine.
#[derive(Clone)]
struct RaftStore {
    mem: MemStorage,
    snap: Arc<RwLock<SnapSource>>,
}

#[derive(Default)]
struct SnapSource {
    applied: u64,
    term: u64,
    conf_state: ConfState,
    data: Vec<u8>,
}

impl Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<raft::RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: raft::GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let src = self.snap.read().unwrap_or_else(|e| e.into_inner());
        if src.applied < request_index || src.applied == 0 {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut s = Snapshot {
            data: src.data.clone().into(),
            ..Default::default()
        };
        let m = s.mut_metadata();
        m.index = src.applied;
        m.term = src.term;
        m.set_conf_state(src.conf_state.clone());
        Ok(s)
    }
}

fn conf_state_of(mem: &MemStorage) -> ConfState {
    mem.initial_state()
        .map(|s| s.conf_state)
        .unwrap_or_default()
}

/// Forwards raft-rs's slog records to tracing.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, r: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match r.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}", r.msg())
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}", r.msg()),
            slog::Level::Info => tracing::debug!(target: "raft", "{}", r.msg()),
            _ => tracing::trace!(target: "raft", "{}", r.msg()),
        }
        Ok(())
    }
}

/// How the node starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// A new cluster with this node as its only voter.
    NewCluster,
    /// A node that has joined (or is joining) an existing cluster: start empty and let the
    /// leader send the log or a snapshot.
    Join,
    /// Restart from persisted state.
    Restart,
}

impl RaftNode {
    /// Opens the raft log in `db` and starts the raft thread.
    pub fn start(
        id: u64,
        db: &sled::Db,
        bootstrap: Bootstrap,
        transport: Arc<dyn RaftTransport>,
    ) -> Result<Arc<RaftNode>, RaftError> {
        let persist = Persist {
            log: db.open_tree("raft_log").map_err(pb_err)?,
            meta: db.open_tree("raft_meta").map_err(pb_err)?,
            db: db.clone(),
        };
        let mem = MemStorage::new();
        let mut state = ClusterState::default();
        let mut applied = 0u64;
        match bootstrap {
            Bootstrap::NewCluster => {
                // The initial configuration lives in a snapshot at index 1, not in the log, so
                // every node that joins later catches up by snapshot first and learns it.
                let cs = ConfState::from((vec![id], vec![]));
                let meta = raft::eraftpb::SnapshotMetadata {
                    index: 1,
                    term: 1,
                    ..Default::default()
                };
                let mut s = Snapshot::default();
                let mut with_cs = meta.clone();
                with_cs.set_conf_state(cs.clone());
                s.set_metadata(with_cs);
                mem.wl()
                    .apply_snapshot(s)
                    .map_err(|e| RaftError::Storage(e.to_string()))?;
                applied = 1;
                persist.put_pb("conf_state", &cs)?;
                persist.put_pb("compacted", &meta)?;
                persist.put_pb("hard_state", mem.rl().hard_state())?;
                persist.save_state(applied, &state)?;
                persist.flush()?;
            }
            Bootstrap::Join => {}
            Bootstrap::Restart => {
                if let Some(cs) = persist.get_pb::<ConfState>("conf_state")? {
                    mem.wl().set_conf_state(cs);
                }
                if let Some(c) = persist.get_pb::<raft::eraftpb::SnapshotMetadata>("compacted")? {
                    let mut s = Snapshot::default();
                    let mut meta = c;
                    meta.set_conf_state(conf_state_of(&mem));
                    s.set_metadata(meta);
                    mem.wl()
                        .apply_snapshot(s)
                        .map_err(|e| RaftError::Storage(e.to_string()))?;
                }
                let mut ents = Vec::new();
                for kv in persist.log.iter() {
                    let (_, v) = kv.map_err(pb_err)?;
                    ents.push(Entry::parse_from_bytes(&v).map_err(pb_err)?);
                }
                let first = mem.first_index().unwrap_or(1);
                ents.retain(|e| e.index >= first);
                mem.wl()
                    .append(&ents)
                    .map_err(|e| RaftError::Storage(e.to_string()))?;
                let mut hs = persist.get_pb::<HardState>("hard_state")?;
                if let Some(b) = persist.meta.get("applied").map_err(pb_err)? {
                    applied = u64::from_be_bytes(b.as_ref().try_into().unwrap_or_default());
                }
                if let Some(b) = persist.meta.get("state").map_err(pb_err)? {
                    state = serde_json::from_slice(&b).map_err(pb_err)?;
                }
                // A store written before the HardState was saved ahead of the state machine
                // may hold `applied > commit`. An entry is applied only once committed, so
                // the commit index is raised to it (never lowering `applied`, which would
                // re-apply entries that are not idempotent, such as `Attach`).
                if let Some(h) = hs.as_mut() {
                    let last = mem.last_index().unwrap_or(0);
                    if applied > h.commit && applied <= last {
                        tracing::warn!(
                            applied,
                            commit = h.commit,
                            "raft commit index behind the applied state; raised to it"
                        );
                        h.commit = applied;
                        persist.put_pb("hard_state", h)?;
                        persist.flush()?;
                    }
                }
                if let Some(h) = hs {
                    mem.wl().set_hardstate(h);
                }
            }
        }
        let cfg = Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        cfg.validate().map_err(|e| RaftError::Raft(e.to_string()))?;
        let snap_voters = conf_state_of(&mem).voters;
        let snap = Arc::new(RwLock::new(SnapSource::default()));
        let store = RaftStore {
            mem: mem.clone(),
            snap: snap.clone(),
        };
        let logger = slog::Logger::root(TracingDrain, slog::o!());
        let raw = RawNode::new(&cfg, store, &logger).map_err(|e| RaftError::Raft(e.to_string()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(RwLock::new(Arc::new(state.clone())));
        let status = Arc::new(RwLock::new(RaftStatus {
            id,
            ..Default::default()
        }));
        let (applied_tx, applied_rx) = watch::channel(applied);
        let epoch = Instant::now();
        let contact_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut worker = Worker {
            id,
            contact_ms: contact_ms.clone(),
            epoch,
            raw,
            mem,
            persist,
            snap,
            state,
            applied,
            shared: shared.clone(),
            status: status.clone(),
            applied_tx,
            transport,
            waiters: HashMap::new(),
            seq: 0,
        };
        worker.refresh_snap_source();
        let thread = std::thread::Builder::new()
            .name("tandem-raft".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        let node = Arc::new(RaftNode {
            id,
            contact_ms,
            epoch,
            tx: std::sync::Mutex::new(tx),
            state: shared,
            status,
            applied_rx,
            thread: std::sync::Mutex::new(Some(thread)),
        });
        // A sole voter need not wait out an election timeout to lead again.
        let sole_voter = snap_voters == [id];
        if matches!(bootstrap, Bootstrap::NewCluster) || sole_voter {
            node.send(Msg::Campaign);
        }
        Ok(node)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    fn send(&self, m: Msg) -> bool {
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(m)
            .is_ok()
    }

    /// The state machine as of the last applied entry on this node.
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn status(&self) -> RaftStatus {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn applied(&self) -> u64 {
        *self.applied_rx.borrow()
    }

    /// Whether a peer is reachable as far as this node can tell: `Some(true)` if heard from
    /// recently, `Some(false)` if known unreachable (only the leader knows), `None` otherwise.
    pub fn peer_activity(&self, id: u64) -> Option<bool> {
        let s = self.status();
        if s.active.contains(&id) {
            Some(true)
        } else if s.inactive.contains(&id) {
            Some(false)
        } else {
            None
        }
    }

    /// How long ago this node last knew it was in contact with a raft majority: as leader,
    /// when a majority of voters was recently active; as follower, when the leader's last
    /// message arrived. A coordinator cut off in a minority sees this grow and stops
    /// serving I/O (its read lease).
    pub fn majority_contact_age(&self) -> Duration {
        let at = self.contact_ms.load(std::sync::atomic::Ordering::Acquire);
        let now = self.epoch.elapsed().as_millis() as u64;
        if at == 0 {
            return Duration::MAX;
        }
        Duration::from_millis(now.saturating_sub(at))
    }

    /// Changes whenever this node applies entries.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied_rx.clone()
    }

    /// Hands a message received from a peer to raft.
    pub fn step(&self, msg: Message) {
        self.send(Msg::Step(Box::new(msg)));
    }

    async fn wait_reply(
        &self,
        rx: oneshot::Receiver<Result<(ApplyOutput, u64), RaftError>>,
    ) -> Result<(ApplyOutput, u64), RaftError> {
        match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
            Err(_) => Err(RaftError::Timeout(PROPOSE_TIMEOUT)),
            Ok(Err(_)) => Err(RaftError::Stopped),
            Ok(Ok(r)) => r,
        }
    }

    /// Proposes a command on this node, which must be the leader. Returns the command's
    /// output and the index it was applied at, once applied here.
    pub async fn propose(&self, cmd: Command) -> Result<(ApplyOutput, u64), RaftError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Msg::Propose(cmd, tx)) {
            return Err(RaftError::Stopped);
        }
        self.wait_reply(rx).await
    }

    /// Adds a raft member (voter or learner); this node must be the leader.
    pub async fn add_member(&self, id: u64, voter: bool) -> Result<u64, RaftError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Msg::AddMember(id, voter, tx)) {
            return Err(RaftError::Stopped);
        }
        self.wait_reply(rx).await.map(|(_, idx)| idx)
    }

    /// Removes a raft member; this node must be the leader.
    pub async fn remove_member(&self, id: u64) -> Result<u64, RaftError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Msg::RemoveMember(id, tx)) {
            return Err(RaftError::Stopped);
        }
        self.wait_reply(rx).await.map(|(_, idx)| idx)
    }

    /// Waits until this node has applied `index` (bounded).
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), RaftError> {
        let mut rx = self.applied_rx.clone();
        let res = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= index)).await;
        match res {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(RaftError::Stopped),
            Err(_) => Err(RaftError::Timeout(timeout)),
        }
    }

    /// Stops the raft thread (after persisting what it has).
    pub fn stop(&self) {
        self.send(Msg::Stop);
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for RaftNode {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker {
    id: u64,
    contact_ms: Arc<std::sync::atomic::AtomicU64>,
    epoch: Instant,
    raw: RawNode<RaftStore>,
    mem: MemStorage,
    persist: Persist,
    snap: Arc<RwLock<SnapSource>>,
    state: ClusterState,
    applied: u64,
    shared: Arc<RwLock<Arc<ClusterState>>>,
    status: Arc<RwLock<RaftStatus>>,
    applied_tx: watch::Sender<u64>,
    transport: Arc<dyn RaftTransport>,
    waiters: HashMap<u64, (Reply, Instant)>,
    seq: u64,
}

impl Worker {
    fn run(&mut self, rx: Receiver<Msg>) {
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    self.on_ready();
                    return;
                }
                Ok(m) => self.handle(m),
                Err(RecvTimeoutError::Timeout) => {}
            }
            // Drain whatever else is queued before handling the ready, to batch fsyncs.
            while let Ok(m) = rx.try_recv() {
                if matches!(m, Msg::Stop) {
                    self.on_ready();
                    return;
                }
                self.handle(m);
            }
            if Instant::now() >= next_tick {
                self.check_majority_contact();
                self.raw.tick();
                next_tick = Instant::now() + TICK;
                self.expire_waiters();
            }
            self.on_ready();
        }
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> RaftError {
        let l = self.raw.raft.leader_id;
        RaftError::NotLeader {
            leader: (l != 0).then_some(l),
        }
    }

    fn envelope(&mut self, cmd: Option<Command>) -> (u64, Vec<u8>) {
        self.seq += 1;
        let env = Envelope {
            proposer: self.id,
            seq: self.seq,
            cmd,
        };
        (
            self.seq,
            serde_json::to_vec(&env).expect("commands serialize"),
        )
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Propose(cmd, reply) => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let (seq, data) = self.envelope(Some(cmd));
                match self.raw.propose(vec![], data) {
                    Ok(()) => {
                        self.waiters.insert(seq, (reply, Instant::now()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(RaftError::Raft(e.to_string())));
                    }
                }
            }
            Msg::AddMember(id, voter, reply) => self.conf_change(
                id,
                if voter {
                    ConfChangeType::AddNode
                } else {
                    ConfChangeType::AddLearnerNode
                },
                reply,
            ),
            Msg::RemoveMember(id, reply) => self.conf_change(id, ConfChangeType::RemoveNode, reply),
            Msg::Step(msg) => {
                let (from, term) = (msg.from, msg.term);
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(error = %e, "raft step refused a message");
                } else if from == self.raw.raft.leader_id
                    && from != self.id
                    && term == self.raw.raft.term
                {
                    self.touch_contact();
                }
            }
            Msg::Campaign => {
                if let Err(e) = self.raw.campaign() {
                    tracing::warn!(error = %e, "raft campaign failed");
                }
            }
            Msg::Stop => {}
        }
    }

    fn touch_contact(&self) {
        // Never 0, which means "never".
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.contact_ms
            .store(now, std::sync::atomic::Ordering::Release);
    }

    /// As leader: a majority of voters (itself included) was recently active.
    fn check_majority_contact(&self) {
        let r = &self.raw.raft;
        if r.state != StateRole::Leader {
            return;
        }
        let voters = conf_state_of(&self.mem).voters;
        let active = voters
            .iter()
            .filter(|id| **id == self.id || r.prs().get(**id).is_some_and(|pr| pr.recent_active))
            .count();
        if active * 2 > voters.len() {
            self.touch_contact();
        }
    }

    fn conf_change(&mut self, id: u64, ty: ConfChangeType, reply: Reply) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let mut cc = ConfChange {
            node_id: id,
            ..Default::default()
        };
        cc.set_change_type(ty);
        let (seq, ctx) = self.envelope(None);
        match self.raw.propose_conf_change(ctx, cc) {
            Ok(()) => {
                self.waiters.insert(seq, (reply, Instant::now()));
            }
            Err(e) => {
                let _ = reply.send(Err(RaftError::Raft(e.to_string())));
            }
        }
    }

    fn expire_waiters(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, (_, t))| now.duration_since(*t) > PROPOSE_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if let Some((r, _)) = self.waiters.remove(&k) {
                let _ = r.send(Err(RaftError::Timeout(PROPOSE_TIMEOUT)));
            }
        }
    }

    fn refresh_snap_source(&mut self) {
        let term = self
            .mem
            .term(self.applied)
            .unwrap_or_else(|_| self.snap.read().map(|s| s.term).unwrap_or(0));
        let mut s = self.snap.write().unwrap_or_else(|e| e.into_inner());
        s.applied = self.applied;
        s.term = term;
        s.conf_state = conf_state_of(&self.mem);
        s.data = serde_json::to_vec(&self.state).expect("state serializes");
    }

    fn fatal(&self, what: &str, e: impl std::fmt::Display) -> ! {
        // Losing raft persistence means this node can no longer keep its promises to the
        // group; stopping is the only safe response.
        tracing::error!(error = %e, "raft persistence failed ({what}); stopping the node");
        eprintln!("tandemd: fatal: raft persistence failed ({what}): {e}");
        std::process::exit(70);
    }

    fn send_msgs(&self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            self.transport.send(msgs);
        }
    }

    fn apply_entries(&mut self, ents: Vec<Entry>) {
        if ents.is_empty() {
            return;
        }
        // Proposers are answered only after the new state is visible, so they read their
        // own writes.
        let mut done = Vec::new();
        for e in ents {
            let index = e.index;
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if !e.data.is_empty() {
                        match serde_json::from_slice::<Envelope>(&e.data) {
                            Ok(env) => {
                                let res = match &env.cmd {
                                    Some(cmd) => self.state.apply(cmd),
                                    None => Ok(ApplyOutput::None),
                                };
                                if env.proposer == self.id {
                                    if let Some((r, _)) = self.waiters.remove(&env.seq) {
                                        done.push((
                                            r,
                                            res.map(|o| (o, index)).map_err(RaftError::Apply),
                                        ));
                                    }
                                }
                            }
                            Err(err) => {
                                tracing::error!(index, error = %err, "undecodable raft entry skipped")
                            }
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = match ConfChange::parse_from_bytes(&e.data) {
                        Ok(cc) => cc,
                        Err(err) => {
                            tracing::error!(index, error = %err, "undecodable conf change skipped");
                            continue;
                        }
                    };
                    match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => {
                            if let Err(err) = self.persist.put_pb("conf_state", &cs) {
                                self.fatal("conf state", err);
                            }
                            self.mem.wl().set_conf_state(cs);
                        }
                        Err(err) => tracing::warn!(index, error = %err, "conf change refused"),
                    }
                    if let Ok(env) = serde_json::from_slice::<Envelope>(&e.context) {
                        if env.proposer == self.id {
                            if let Some((r, _)) = self.waiters.remove(&env.seq) {
                                done.push((r, Ok((ApplyOutput::None, index))));
                            }
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(index, "unexpected ConfChangeV2 entry skipped");
                }
            }
            self.applied = index;
        }
        if let Err(e) = self.persist.save_state(self.applied, &self.state) {
            self.fatal("state machine", e);
        }
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(self.state.clone());
        let _ = self.applied_tx.send(self.applied);
        for (r, res) in done {
            let _ = r.send(res);
        }
        self.maybe_compact();
        self.refresh_snap_source();
    }

    fn maybe_compact(&mut self) {
        let first = self.mem.first_index().unwrap_or(1);
        if self.applied < first + COMPACT_AFTER_ENTRIES {
            return;
        }
        let idx = self.applied;
        let Ok(term) = self.mem.term(idx) else { return };
        if let Err(e) = self.mem.wl().compact(idx) {
            tracing::warn!(error = %e, "raft log compaction failed");
            return;
        }
        // The compacted prefix ends just before `idx`; `idx` itself stays in the log.
        let meta = raft::eraftpb::SnapshotMetadata {
            index: idx - 1,
            term: self.mem.term(idx - 1).unwrap_or(term),
            ..Default::default()
        };
        let removed: Result<Vec<_>, _> =
            self.persist.log.range(..idx.to_be_bytes()).keys().collect();
        match removed {
            Ok(keys) => {
                let mut b = sled::Batch::default();
                for k in keys {
                    b.remove(k);
                }
                if let Err(e) = self.persist.log.apply_batch(b) {
                    self.fatal("log compaction", e);
                }
            }
            Err(e) => self.fatal("log compaction", e),
        }
        if let Err(e) = self.persist.put_pb("compacted", &meta) {
            self.fatal("log compaction", e);
        }
        tracing::debug!(index = idx, "raft log compacted");
    }

    fn on_ready(&mut self) {
        if !self.raw.has_ready() {
            self.update_status();
            return;
        }
        let mut ready = self.raw.ready();
        self.send_msgs(ready.take_messages());

        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            match serde_json::from_slice::<ClusterState>(&snap.data) {
                Ok(st) => {
                    self.state = st;
                    self.applied = snap.get_metadata().index;
                }
                Err(e) => self.fatal("decode snapshot", e),
            }
            let meta = snap.get_metadata().clone();
            if let Err(e) = self.mem.wl().apply_snapshot(snap) {
                self.fatal("apply snapshot", e);
            }
            // The log, its compaction point, the configuration, the HardState and the state
            // machine change in one sled transaction: a crash leaves the old or the new.
            let hs = ready
                .hs()
                .cloned()
                .unwrap_or_else(|| self.mem.rl().hard_state().clone());
            if let Err(e) = self
                .persist
                .install_snapshot(&meta, &hs, self.applied, &self.state)
            {
                self.fatal("persist snapshot", e);
            }
            *self.shared.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(self.state.clone());
        }

        let committed = ready.take_committed_entries();

        if !ready.entries().is_empty() {
            if let Err(e) = self.persist.append(ready.entries()) {
                self.fatal("append log", e);
            }
            if let Err(e) = self.mem.wl().append(ready.entries()) {
                self.fatal("append log (memory)", e);
            }
        }
        if let Some(hs) = ready.hs() {
            if let Err(e) = self.persist.put_pb("hard_state", hs) {
                self.fatal("hard state", e);
            }
            self.mem.wl().set_hardstate(hs.clone());
        }
        // Applied only after the HardState carrying their commit index is written: sled
        // keeps writes in order, so a crash never leaves `applied` ahead of `commit`.
        self.apply_entries(committed);
        if let Err(e) = self.persist.flush() {
            self.fatal("flush", e);
        }
        self.send_msgs(ready.take_persisted_messages());

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.mem.wl().mut_hard_state().set_commit(commit);
            let hs = self.mem.rl().hard_state().clone();
            if let Err(e) = self.persist.put_pb("hard_state", &hs) {
                self.fatal("hard state", e);
            }
        }
        self.send_msgs(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed);
        self.raw.advance_apply();
        let _ = self.applied_tx.send(self.applied);
        self.update_status();
    }

    fn update_status(&self) {
        let r = &self.raw.raft;
        let cs = conf_state_of(&self.mem);
        let mut s = self.status.write().unwrap_or_else(|e| e.into_inner());
        s.leader_id = r.leader_id;
        s.term = r.term;
        s.commit = r.raft_log.committed;
        s.applied = self.applied;
        s.role = format!("{:?}", r.state).to_lowercase();
        s.voters = cs.voters.clone();
        s.learners = cs.learners.clone();
        s.active.clear();
        s.inactive.clear();
        if r.state == StateRole::Leader {
            for (id, pr) in r.prs().iter() {
                if *id == self.id {
                    continue;
                }
                if pr.recent_active {
                    s.active.push(*id);
                } else {
                    s.inactive.push(*id);
                }
            }
        } else if r.leader_id != 0 {
            s.active.push(r.leader_id);
        }
    }
}
