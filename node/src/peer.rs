//! Node-to-node control plane over gRPC (`tandem.v1.PeerService`): raft messages, joining,
//! and proposals forwarded to the leader.
//!
//! Every request carries an HMAC-SHA256 keyed by the cluster token over its contents
//! (`wire::auth::mac`), checked before anything in it is decoded. raft-rs 0.7 decodes with
//! protobuf 2 (RUSTSEC-2024-0437), so unauthenticated bytes never reach that decoder. The
//! token itself is never sent. Joining is a challenge-response: the joiner proves the token
//! by MACing a fresh server nonce.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use tandem_engine::cluster::{
    ApplyError, ApplyOutput, ClusterError, ClusterHandle, Command, ForwardError, Forwarder,
    NodeRecord, NodeRole, Proposal, RaftTransport,
};
use tandem_engine::volume::VolumeManager;
use tandem_engine::wire::auth;
use tandem_proto::admin as pb;
use tandem_proto::admin::peer_service_client::PeerServiceClient;
use tandem_proto::admin::peer_service_server::PeerService;

/// How long a join nonce stays valid.
pub const JOIN_NONCE_TTL: Duration = Duration::from_secs(60);
/// Outstanding join nonces kept at once (bounds memory under a flood of challenges).
pub const MAX_JOIN_NONCES: usize = 1024;
/// Timeout of one raft message batch to a peer.
pub const RAFT_SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of a forwarded proposal (the leader waits up to its own propose timeout).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(20);
/// Raft messages queued per peer; raft retransmits what is dropped.
pub const PEER_QUEUE: usize = 1024;

fn raft_mac(token: &[u8], from: u64, payload: &[u8]) -> [u8; 32] {
    auth::mac(token, &[b"tandem-raft", &from.to_be_bytes(), payload])
}

fn propose_mac(token: &[u8], from: u64, payload: &[u8]) -> [u8; 32] {
    auth::mac(token, &[b"tandem-propose", &from.to_be_bytes(), payload])
}

/// The MAC a joiner sends: over the nonce and every field of its request.
pub fn join_mac(token: &[u8], r: &pb::JoinRequest) -> [u8; 32] {
    auth::mac(
        token,
        &[
            b"tandem-join",
            &r.nonce,
            r.name.as_bytes(),
            r.admin_addr.as_bytes(),
            r.data_addr.as_bytes(),
            r.domain.as_bytes(),
            r.zone.as_bytes(),
            r.rack.as_bytes(),
            r.role.as_bytes(),
            &r.pool_size_bytes.to_be_bytes(),
            r.instance.as_bytes(),
        ],
    )
}

/// Constant-time equality of a MAC and a received tag.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn endpoint(addr: &str) -> Result<Endpoint, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| e.connect_timeout(Duration::from_secs(2)))
        .map_err(|e| format!("bad peer address {addr}: {e}"))
}

/// Sends raft messages to peers, one queue and one task per peer.
pub struct GrpcTransport {
    inner: Arc<TransportInner>,
}

struct TransportInner {
    me: u64,
    token: Arc<Vec<u8>>,
    cluster: OnceLock<Weak<ClusterHandle>>,
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    runtime: tokio::runtime::Handle,
}

impl GrpcTransport {
    /// Must be called inside the tokio runtime (peer tasks are spawned on it).
    pub fn new(me: u64, token: Arc<Vec<u8>>) -> Arc<GrpcTransport> {
        Arc::new(GrpcTransport {
            inner: Arc::new(TransportInner {
                me,
                token,
                cluster: OnceLock::new(),
                peers: Mutex::new(HashMap::new()),
                runtime: tokio::runtime::Handle::current(),
            }),
        })
    }

    /// Connects the transport to the cluster handle it learns addresses from.
    pub fn bind(&self, cluster: &Arc<ClusterHandle>) {
        let _ = self.inner.cluster.set(Arc::downgrade(cluster));
    }
}

impl TransportInner {
    fn queue(self: &Arc<Self>, to: u64) -> mpsc::Sender<Message> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = peers.get(&to) {
            if !q.is_closed() {
                return q.clone();
            }
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        peers.insert(to, tx.clone());
        let this = self.clone();
        self.runtime
            .spawn(async move { this.peer_loop(to, rx).await });
        tx
    }

    async fn peer_loop(self: Arc<Self>, to: u64, mut rx: mpsc::Receiver<Message>) {
        let mut client: Option<(String, PeerServiceClient<Channel>)> = None;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
                if batch.len() >= 256 {
                    break;
                }
            }
            let Some(addr) = self
                .cluster
                .get()
                .and_then(Weak::upgrade)
                .and_then(|c| c.admin_addr(to))
            else {
                continue;
            };
            if client.as_ref().map(|(a, _)| a != &addr).unwrap_or(true) {
                match endpoint(&addr) {
                    Ok(ep) => {
                        client = Some((addr.clone(), PeerServiceClient::new(ep.connect_lazy())))
                    }
                    Err(e) => {
                        tracing::warn!(peer = to, error = %e, "raft peer address unusable");
                        continue;
                    }
                }
            }
            let mut payload = Vec::new();
            for m in &batch {
                match m.write_to_bytes() {
                    Ok(b) => {
                        payload.extend_from_slice(&(b.len() as u32).to_be_bytes());
                        payload.extend_from_slice(&b);
                    }
                    Err(e) => tracing::error!(error = %e, "encoding a raft message failed"),
                }
            }
            let req = pb::RaftRequest {
                from: self.me,
                mac: raft_mac(&self.token, self.me, &payload).to_vec(),
                messages: payload,
            };
            if let Some((_, c)) = client.as_mut() {
                let mut r = Request::new(req);
                r.set_timeout(RAFT_SEND_TIMEOUT);
                if let Err(e) = c.raft(r).await {
                    tracing::debug!(peer = to, error = %e, "raft send failed; raft will retry");
                    if e.code() == tonic::Code::PermissionDenied {
                        tracing::error!(peer = to, "peer refused our cluster token");
                    }
                }
            }
        }
    }
}

impl RaftTransport for GrpcTransport {
    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            if m.to == self.inner.me || m.to == 0 {
                continue;
            }
            let q = self.inner.queue(m.to);
            if q.try_send(m).is_err() {
                tracing::debug!("raft peer queue full; dropping a message (raft retries)");
            }
        }
    }
}

/// Forwards proposals to the leader over `PeerService.Propose`.
pub struct GrpcForwarder {
    pub me: u64,
    pub token: Arc<Vec<u8>>,
}

#[async_trait::async_trait]
impl Forwarder for GrpcForwarder {
    async fn forward(
        &self,
        admin_addr: &str,
        proposal: &Proposal,
    ) -> Result<(Result<ApplyOutput, ApplyError>, u64), ForwardError> {
        let ep = endpoint(admin_addr).map_err(ForwardError::NotDelivered)?;
        let ch = ep
            .connect()
            .await
            .map_err(|e| ForwardError::NotDelivered(format!("connect {admin_addr}: {e}")))?;
        let payload = serde_json::to_vec(proposal).expect("proposals serialize");
        let mut req = Request::new(pb::ProposeRequest {
            from: self.me,
            mac: propose_mac(&self.token, self.me, &payload).to_vec(),
            proposal: payload,
        });
        req.set_timeout(FORWARD_TIMEOUT);
        match PeerServiceClient::new(ch).propose(req).await {
            Ok(resp) => {
                let r = resp.into_inner();
                let outcome: Result<ApplyOutput, ApplyError> =
                    serde_json::from_slice(&r.outcome)
                        .map_err(|e| ForwardError::Unknown(format!("undecodable outcome: {e}")))?;
                Ok((outcome, r.index))
            }
            // The leader refused before proposing: safe to retry elsewhere.
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    || s.code() == tonic::Code::FailedPrecondition =>
            {
                Err(ForwardError::NotDelivered(s.message().to_string()))
            }
            Err(s) => Err(ForwardError::Unknown(s.message().to_string())),
        }
    }
}

/// Timeout of one `ReplicaUsage` call: `volume inspect` waits at most this long for a
/// replica's node, and shows its allocation as unknown after it.
pub const USAGE_TIMEOUT: Duration = Duration::from_secs(2);

fn usage_mac(token: &[u8], from: u64, ids: &[String]) -> [u8; 32] {
    let mut parts: Vec<&[u8]> = vec![b"tandem-usage"];
    let from = from.to_be_bytes();
    parts.push(&from);
    // `auth::mac` length-prefixes every part, so no two id lists MAC alike.
    parts.extend(ids.iter().map(|id| id.as_bytes()));
    auth::mac(token, &parts)
}

/// Asks the node at `admin_addr` what its replicas of `ids` hold (`PeerService.ReplicaUsage`),
/// within [`USAGE_TIMEOUT`]: volume id -> allocated bytes, for the replicas it has open.
pub async fn replica_usage(
    admin_addr: &str,
    token: &[u8],
    from: u64,
    volume_ids: Vec<String>,
) -> Result<HashMap<String, u64>, String> {
    let call = async {
        let ch = endpoint(admin_addr)?
            .connect()
            .await
            .map_err(|e| format!("connect {admin_addr}: {e}"))?;
        let mut req = Request::new(pb::ReplicaUsageRequest {
            from,
            mac: usage_mac(token, from, &volume_ids).to_vec(),
            volume_ids,
        });
        req.set_timeout(USAGE_TIMEOUT);
        PeerServiceClient::new(ch)
            .replica_usage(req)
            .await
            .map(|r| r.into_inner().allocated_bytes)
            .map_err(|s| format!("{admin_addr}: {}", s.message()))
    };
    tokio::time::timeout(USAGE_TIMEOUT, call)
        .await
        .map_err(|_| format!("{admin_addr}: no answer within {USAGE_TIMEOUT:?}"))?
}

/// The server side of `PeerService`.
pub struct PeerApi {
    cluster: OnceLock<Arc<ClusterHandle>>,
    volumes: OnceLock<Arc<VolumeManager>>,
    token: Arc<Vec<u8>>,
    nonces: Mutex<HashMap<Vec<u8>, Instant>>,
}

impl PeerApi {
    pub fn new(token: Arc<Vec<u8>>) -> Arc<PeerApi> {
        Arc::new(PeerApi {
            cluster: OnceLock::new(),
            volumes: OnceLock::new(),
            token,
            nonces: Mutex::new(HashMap::new()),
        })
    }

    pub fn bind(&self, cluster: Arc<ClusterHandle>) {
        let _ = self.cluster.set(cluster);
    }

    /// Connects the volume manager, which answers `ReplicaUsage`.
    pub fn bind_volumes(&self, volumes: Arc<VolumeManager>) {
        let _ = self.volumes.set(volumes);
    }

    fn cluster(&self) -> Result<&Arc<ClusterHandle>, Status> {
        self.cluster
            .get()
            .ok_or_else(|| Status::unavailable("this node is still starting"))
    }
}

fn peer_of<T>(r: &Request<T>) -> String {
    r.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    async fn raft(
        &self,
        req: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        if !auth::verify(
            &self.token,
            &[b"tandem-raft", &r.from.to_be_bytes(), &r.messages],
            &r.mac,
        ) {
            tracing::warn!(%peer, "refused raft messages: wrong cluster token");
            return Err(Status::permission_denied("wrong cluster token"));
        }
        let cluster = self.cluster()?;
        let mut rest = &r.messages[..];
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(Status::invalid_argument("truncated raft batch"));
            }
            let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(body) = rest.get(4..4 + n) else {
                return Err(Status::invalid_argument("truncated raft message"));
            };
            let msg = Message::parse_from_bytes(body)
                .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
            cluster.raft().step(msg);
            rest = &rest[4 + n..];
        }
        Ok(Response::new(pb::RaftResponse {}))
    }

    async fn join_challenge(
        &self,
        _req: Request<pb::JoinChallengeRequest>,
    ) -> Result<Response<pb::JoinChallengeResponse>, Status> {
        let mut nonce = vec![0u8; 32];
        getrandom::fill(&mut nonce).map_err(|e| Status::internal(format!("no randomness: {e}")))?;
        let mut nonces = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        nonces.retain(|_, t| now.duration_since(*t) < JOIN_NONCE_TTL);
        if nonces.len() >= MAX_JOIN_NONCES {
            return Err(Status::resource_exhausted(
                "too many pending joins; retry later",
            ));
        }
        nonces.insert(nonce.clone(), now);
        Ok(Response::new(pb::JoinChallengeResponse { nonce }))
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        let fresh = self
            .nonces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.nonce)
            .is_some_and(|t| t.elapsed() < JOIN_NONCE_TTL);
        if !fresh {
            return Err(Status::permission_denied(
                "join challenge expired or unknown; retry the join",
            ));
        }
        let expected = join_mac(&self.token, &r);
        if !ct_eq(&expected, &r.mac) {
            tracing::warn!(%peer, name = %r.name, "refused a join: wrong cluster token");
            return Err(Status::permission_denied(
                "join refused: wrong cluster token (see `tandemctl cluster token show` on a member)",
            ));
        }
        let cluster = self.cluster()?;
        // `--witness` and `--kvdb` pin the node as a voter; any other storage node votes
        // when the leader's placement by topology picks it (`cluster::membership`).
        let role = match r.role.as_str() {
            "witness" => NodeRole::Witness,
            "voter" => NodeRole::Voter,
            _ => NodeRole::Learner,
        };
        let rec = NodeRecord {
            id: 0,
            name: r.name.clone(),
            admin_addr: r.admin_addr.clone(),
            data_addr: r.data_addr.clone(),
            domain: r.domain.clone(),
            zone: r.zone.clone(),
            rack: r.rack.clone(),
            role,
            pool_size_bytes: r.pool_size_bytes,
            joined_unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            instance: r.instance.clone(),
        };
        let id = match cluster
            .propose(Command::AddNode { node: rec })
            .await
            .map_err(|e| match e {
                ClusterError::Apply(e @ ApplyError::NodeNameTaken { .. }) => {
                    tracing::warn!(%peer, name = %r.name, "refused a join: {e}");
                    Status::already_exists(e.to_string())
                }
                e => Status::unavailable(e.to_string()),
            })? {
            ApplyOutput::NodeId(id) => id,
            other => {
                return Err(Status::internal(format!(
                    "unexpected join outcome {other:?}"
                )))
            }
        };
        // The same join retried keeps its id and role.
        let role = cluster
            .state()
            .nodes
            .get(&id)
            .map(|n| n.role)
            .unwrap_or(role);
        // A new member starts as a learner: it cannot change the majority before it runs.
        // The leader promotes it to voter (when pinned or placed) once it answers, and
        // retries a change that concurrent joins made raft refuse (`cluster::membership`).
        let status = cluster.status();
        if !status.voters.contains(&id) && !status.learners.contains(&id) {
            if let Err(e) = cluster.add_member(id, false).await {
                tracing::info!(name = %r.name, id, error = %e, "raft learner not added yet; the leader retries");
            }
        }
        tracing::info!(%peer, name = %r.name, id, ?role, "node joined");
        let state = cluster.state();
        Ok(Response::new(pb::JoinResponse {
            node_id: id,
            cluster_id: state.cluster_id.clone(),
            peers: state
                .nodes
                .values()
                .map(|n| (n.id, n.admin_addr.clone()))
                .collect(),
        }))
    }

    async fn replica_usage(
        &self,
        req: Request<pb::ReplicaUsageRequest>,
    ) -> Result<Response<pb::ReplicaUsageResponse>, Status> {
        let r = req.into_inner();
        if !ct_eq(&usage_mac(&self.token, r.from, &r.volume_ids), &r.mac) {
            return Err(Status::permission_denied("wrong cluster token"));
        }
        let vm = self
            .volumes
            .get()
            .ok_or_else(|| Status::unavailable("this node is still starting"))?;
        Ok(Response::new(pb::ReplicaUsageResponse {
            allocated_bytes: vm.local_allocation(&r.volume_ids).await,
        }))
    }

    async fn propose(
        &self,
        req: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let r = req.into_inner();
        if !auth::verify(
            &self.token,
            &[b"tandem-propose", &r.from.to_be_bytes(), &r.proposal],
            &r.mac,
        ) {
            return Err(Status::permission_denied("wrong cluster token"));
        }
        let p: Proposal = serde_json::from_slice(&r.proposal)
            .map_err(|e| Status::invalid_argument(format!("bad proposal: {e}")))?;
        let cluster = self.cluster()?;
        match cluster.propose_local(&p).await {
            Ok((outcome, index)) => Ok(Response::new(pb::ProposeResponse {
                outcome: serde_json::to_vec(&outcome).expect("outcomes serialize"),
                index,
            })),
            Err(tandem_engine::cluster::RaftError::NotLeader { .. }) => {
                Err(Status::unavailable("not the raft leader"))
            }
            Err(e) => Err(Status::deadline_exceeded(e.to_string())),
        }
    }
}

/// Joins a cluster through `seed` (a member's admin address). Returns the assigned raft id,
/// the cluster id and the members' admin addresses.
pub async fn join_cluster(
    seed: &str,
    token: &[u8],
    mut req: pb::JoinRequest,
) -> anyhow::Result<pb::JoinResponse> {
    use anyhow::Context;
    let ch = endpoint(seed)
        .map_err(anyhow::Error::msg)?
        .connect()
        .await
        .with_context(|| format!("cannot reach the cluster member at {seed}"))?;
    let mut client = PeerServiceClient::new(ch);
    let nonce = client
        .join_challenge(pb::JoinChallengeRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("join challenge from {seed} failed: {}", s.message()))?
        .into_inner()
        .nonce;
    req.nonce = nonce;
    req.mac = join_mac(token, &req).to_vec();
    let mut r = Request::new(req);
    r.set_timeout(Duration::from_secs(60));
    client
        .join(r)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| anyhow::anyhow!("join refused by {seed}: {}", s.message()))
}
