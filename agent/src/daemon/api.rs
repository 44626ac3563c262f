//! The admin API as its clients see it: the route paths and the request and
//! response bodies. The daemon's router ([`super::admin`]), the CLI client
//! and the operator all use these, so a path or a field is spelled once.
//! Without the `node` feature, the paths and the bodies that do not carry
//! the node's own types are available.

use serde::{Deserialize, Serialize};

use crate::identity::AgentId;
#[cfg(feature = "node")]
pub use crate::node::publish::PublishStarted;
#[cfg(feature = "node")]
pub use crate::node::share::Role;
#[cfg(feature = "node")]
pub use crate::node::trust::{
    GrantInfo, GrantRequest, RevokeRequest, RevokeResponse, TrustListing, WhyAnswer,
};
#[cfg(feature = "node")]
pub use crate::node::{
    FetchRequest, FetchState, Forgotten, ProgressSnapshot, PublishRequest, Published,
};

/// `GET`: [`Status`].
pub const STATUS: &str = "/v1/status";
/// `POST` a [`PublishRequest`]: [`Published`]. With the query
/// [`STREAM_QUERY`]: JSON lines, a [`PublishStarted`] as soon as the
/// tickets exist, then the [`Published`] (or an [`ApiError`]).
pub const SHARES: &str = "/v1/shares";
/// Query of [`SHARES`] asking for the answer in JSON lines.
pub const STREAM_QUERY: &str = "stream=1";
/// `DELETE`: forgets a held share, published or fetched: it is no
/// longer served, its state goes, its files stay ([`Forgotten`]).
pub const SHARE: &str = "/v1/shares/{id}";
/// `POST` a [`TicketRequest`]: [`TicketResponse`].
pub const SHARE_TICKETS: &str = "/v1/shares/{id}/tickets";
/// `GET`: the [`PeerInfo`]s the repositories name for a share.
pub const SHARE_PEERS: &str = "/v1/shares/{id}/peers";
/// `POST` a [`FetchRequest`]: [`ProgressSnapshot`].
pub const FETCHES: &str = "/v1/fetches";
/// `GET`: a fetch's [`ProgressSnapshot`]; `DELETE`: cancels an unfinished
/// fetch that is not running (`{"share_id", "cancelled": true}`).
pub const FETCH: &str = "/v1/fetches/{id}";
/// `GET`: [`TrustListing`].
pub const TRUST: &str = "/v1/trust";
/// `POST` a [`GrantRequest`]: [`GrantInfo`].
pub const TRUST_GRANTS: &str = "/v1/trust/grants";
/// `POST` a [`RevokeRequest`]: [`RevokeResponse`].
pub const TRUST_REVOCATIONS: &str = "/v1/trust/revocations";
/// `GET`: [`WhyAnswer`].
pub const TRUST_WHY: &str = "/v1/trust/why/{agent}";

/// `PUT` a [`DeclaredShare`], `GET` its [`DeclaredShareStatus`], `DELETE`
/// to stop serving or following it: `{DECLARED_SHARES}/{name}`.
pub const DECLARED_SHARES: &str = "/v1/declared/shares";
/// `PUT` a [`DeclaredGrant`] ([`DeclaredGrantStatus`]), `DELETE` to revoke
/// it ([`RevocationStatus`]): `{DECLARED_GRANTS}/{key}`.
pub const DECLARED_GRANTS: &str = "/v1/declared/grants";
/// `GET`: [`ActivityReport`], polled by the operator for scale to zero.
pub const ACTIVITY: &str = "/v1/activity";

/// [`SHARE`] for one share.
pub fn share(share: &str) -> String {
    SHARE.replace("{id}", share)
}

/// [`SHARE_TICKETS`] for one share.
pub fn share_tickets(share: &str) -> String {
    SHARE_TICKETS.replace("{id}", share)
}

/// [`SHARE_PEERS`] for one share.
pub fn share_peers(share: &str) -> String {
    SHARE_PEERS.replace("{id}", share)
}

/// [`FETCH`] for one share.
pub fn fetch(share: &str) -> String {
    FETCH.replace("{id}", share)
}

/// [`TRUST_WHY`] for one agent.
pub fn trust_why(agent: &str) -> String {
    TRUST_WHY.replace("{agent}", agent)
}

/// Everything the admin API reports about an agent.
#[cfg(feature = "node")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This agent's id.
    pub agent_id: String,
    /// Build version.
    pub version: String,
    /// Addresses advertised to peers.
    pub advertise: Vec<String>,
    /// Shares held.
    pub shares: Vec<ShareSummary>,
    /// Fetches started since the agent started.
    pub fetches: Vec<ProgressSnapshot>,
}

/// One held share in [`Status`].
#[cfg(feature = "node")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareSummary {
    /// Share id.
    pub share_id: String,
    /// `published` or `fetched`.
    pub role: Role,
    /// Version held.
    pub seq: u64,
    /// Files.
    pub files: u64,
    /// Bytes.
    pub bytes: u64,
    /// Chunks.
    pub chunks: u64,
    /// Where the files are in storage.
    pub root: String,
}

/// Body of `POST /v1/shares/{id}/tickets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketRequest {
    /// Recipient agent id.
    pub recipient: AgentId,
}

/// Body of the ticket response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketResponse {
    /// The ticket text.
    pub ticket: String,
}

/// An error as the admin API returns it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
    /// In a streamed answer, whose HTTP status went out before the error
    /// was known: the status it would have had (4xx: the request's fault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// One peer in `GET /v1/shares/{id}/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The agent.
    pub agent_id: String,
    /// Where to dial it.
    pub addresses: Vec<String>,
}

// The declarative part of the admin API (what the operator uses) lives in
// the light `declare` module, below the node that implements it.
pub use crate::declare::{
    ActivityReport, DUE_SOON_SECS, DeclaredGrant, DeclaredGrantStatus, DeclaredPublish,
    DeclaredShare, DeclaredShareStatus, DeclaredState, DeclaredSubscribe, RecipientTicket,
    RevocationStatus, activity, reasons,
};

/// How every answer of a starting daemon's admin API begins (a command
/// run right after `run` waits while it sees this).
pub const STARTING: &str = "the agent is starting";
/// What a starting agent waits for while its storage does not answer, in
/// its 503 answers (after [`STARTING`]); the operator reports it as the
/// Agent's `StorageUnreachable`.
pub const WAITING_FOR_STORAGE: &str = "waiting for its storage, not reachable yet";
