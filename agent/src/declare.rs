//! The declarative part of the agent admin API, used by the operator (see
//! docs/operator.md, "Operator ↔ agent"): the whole desired state of a share
//! or grant under a stable key, idempotent, persisted by the agent under
//! `<state prefix>declared/`, converged in the background. The routes are
//! `daemon::api::DECLARED_SHARES` and `DECLARED_GRANTS`; the node's
//! `declared` module implements them. Light: no data plane needed.

use serde::{Deserialize, Serialize};

/// Reason codes an agent reports for a share it cannot move forward.
pub mod reasons {
    /// The ticket does not parse or its signature is wrong.
    pub const TICKET_INVALID: &str = "TicketInvalid";
    /// The ticket or share is for another agent / this agent is not allowed.
    pub const NOT_A_RECIPIENT: &str = "NotARecipient";
    /// The trust chain that allowed this agent was revoked.
    pub const TRUST_REVOKED: &str = "TrustRevoked";
    /// No holder of the share could be reached.
    pub const PUBLISHER_UNREACHABLE: &str = "PublisherUnreachable";
    /// The agent's own storage failed.
    pub const STORAGE_ERROR: &str = "StorageError";
    /// The folder to publish does not exist.
    pub const PATH_NOT_FOUND: &str = "PathNotFound";
    /// The declared spec is malformed (the operator checks first; this is
    /// the agent's own check).
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// Body of `PUT /v1/declared/shares/{name}`: the whole desired state of one
/// share. Exactly one of `publish` / `subscribe`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeclaredShare {
    /// Generation of the declaring Share (echoed in the status, so the
    /// operator knows which spec the status describes).
    pub generation: i64,
    /// Publish a folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<DeclaredPublish>,
    /// Fetch and follow a share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<DeclaredSubscribe>,
}

/// Publish side of a [`DeclaredShare`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeclaredPublish {
    /// Folder in the agent's storage (normalised: relative, no `..`).
    pub path: String,
    /// Explicit recipients (agent ids).
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Also every agent trusted within this many hops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_depth: Option<u8>,
    /// Seconds between rescans of `path`.
    pub rescan_secs: u64,
    /// Stage encrypted chunks for presigned download.
    #[serde(default)]
    pub offline_seeding: bool,
}

/// Subscribe side of a [`DeclaredShare`]: a ticket, or share id + publisher.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeclaredSubscribe {
    /// Ticket text (`caravan-ticket-v1:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// Share id, when subscribing without a ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
    /// Publisher agent id, with `share_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    /// Destination folder in the agent's storage (normalised).
    pub destination: String,
    /// Seconds between looks for a newer version.
    pub poll_secs: u64,
}

/// How far a declared share is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeclaredState {
    /// Accepted, nothing done yet.
    Pending,
    /// Publishing or fetching.
    Progressing,
    /// Published, or fetched at the newest version known.
    Ready,
    /// Stopped on an error; `reason` says which. Retried in the background.
    Failed,
}

/// A ticket for one explicit recipient.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RecipientTicket {
    /// Recipient agent id.
    pub agent_id: String,
    /// Ticket text.
    pub ticket: String,
}

/// Answer of `PUT` and `GET /v1/declared/shares/{name}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeclaredShareStatus {
    /// The name it was declared under.
    pub name: String,
    /// The generation this status describes.
    pub generation: i64,
    /// Where it stands.
    pub state: DeclaredState,
    /// A reason code (see [`reasons`]) when failed or waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Share id, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
    /// Publisher agent id, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    /// Version published or fetched (0: none yet).
    #[serde(default)]
    pub version: u64,
    /// Files done (subscribe) or in the share (publish).
    #[serde(default)]
    pub files_done: u64,
    /// Files in the version.
    #[serde(default)]
    pub files_total: u64,
    /// Bytes done.
    #[serde(default)]
    pub bytes_done: u64,
    /// Bytes in the version.
    #[serde(default)]
    pub bytes_total: u64,
    /// Chunks done.
    #[serde(default)]
    pub chunks_done: u64,
    /// Chunks in the version.
    #[serde(default)]
    pub chunks_total: u64,
    /// Subscribe: ciphertext bytes received for this version.
    #[serde(default)]
    pub bytes_received: u64,
    /// Peers exchanging chunks of it now.
    #[serde(default)]
    pub peers: u32,
    /// Publish: tickets of explicit recipients.
    #[serde(default)]
    pub tickets: Vec<RecipientTicket>,
    /// Publish with a trust depth: the keyless ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyless_ticket: Option<String>,
}

/// Body of `PUT /v1/declared/grants/{key}`: the issuing agent signs a grant
/// for `subject` once per key and spec, and publishes it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeclaredGrant {
    /// Agent id vouched for.
    pub subject: String,
    /// Further hops the subject may vouch.
    pub depth: u8,
    /// What the trust covers (`None`: everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Expiry (unix seconds); `None`: the agent's default validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// Answer of `PUT` / `GET /v1/declared/grants/{key}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeclaredGrantStatus {
    /// Id of the signed grant (hex).
    pub grant_id: String,
    /// Issuer agent id.
    pub issuer: String,
    /// Subject agent id.
    pub subject: String,
    /// Depth as signed.
    pub depth: u8,
    /// Expiry as signed (unix seconds).
    pub not_after: u64,
    /// Stored by at least one repository (or there are none to store it).
    pub published: bool,
    /// Repositories that hold it.
    #[serde(default)]
    pub published_to: Vec<String>,
}

/// Answer of `DELETE /v1/declared/grants/{key}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RevocationStatus {
    /// Grant ids revoked by this call or before it (hex).
    #[serde(default)]
    pub revoked: Vec<String>,
    /// The revocation reached at least one repository (or there are none).
    pub published: bool,
}

/// Answer of `GET /v1/activity` (`daemon::api::ACTIVITY`): what the
/// operator needs to decide whether the agent may sleep (scale to zero) and
/// when it must be woken again. Cheap to compute: no storage or network
/// access, only counters the agent keeps anyway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ActivityReport {
    /// Seconds since the agent process started.
    #[serde(default)]
    pub uptime_secs: u64,
    /// Seconds since the last fetch, serve, publish or declared change;
    /// `None` when there was none since the process started (a pod woken
    /// only for a rescan that found nothing new may sleep again at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_secs: Option<u64>,
    /// What that last activity was (see [`activity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<String>,
    /// Work in progress or due within [`DUE_SOON_SECS`] (a fetch running,
    /// a declared share not settled, a rescan due soon): one line each,
    /// at most [`MAX_PENDING`]. Empty: nothing keeps the agent awake.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// The earliest time (unix seconds) the agent must be awake again for
    /// scheduled work: the next rescan of a published share, or the next
    /// refresh of offline-seeding URLs. `None`: nothing scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_wake_unix: Option<u64>,
    /// What is due at `next_wake_unix`, for people (`rescan of share …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_wake_reason: Option<String>,
    /// The next refresh of presigned offline-seeding URLs (unix seconds),
    /// when offline seeding is on; already folded into `next_wake_unix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_url_refresh_unix: Option<u64>,
}

impl ActivityReport {
    /// Whether something keeps the agent awake right now.
    pub fn busy(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Scheduled work due within this many seconds counts as pending: waking a
/// pod takes seconds, so sleeping just before a rescan saves nothing.
pub const DUE_SOON_SECS: u64 = 30;
/// Most pending-work lines in an [`ActivityReport`].
pub const MAX_PENDING: usize = 16;

/// Names of the kinds of activity in [`ActivityReport::last_activity`].
pub mod activity {
    /// Served a chunk to a peer (manifest and key requests, which every
    /// subscriber's poll makes, are not activity).
    pub const SERVE: &str = "serve";
    /// Fetched (received) chunks.
    pub const FETCH: &str = "fetch";
    /// Published a new version.
    pub const PUBLISH: &str = "publish";
    /// A declared share or grant was added, changed or removed.
    pub const DECLARED: &str = "declared";
}
