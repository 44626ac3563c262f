//! The agent and everything it does: publish, serve peers, fetch, its
//! trust state and its state folders. [`agent`] defines [`Agent`]; each
//! other file adds one ability to it (`impl Agent` blocks) or holds one
//! piece of its state, and imports [`agent::Agent`] directly, so no file
//! of this wing imports this one back.

pub mod activity;
pub mod activity_report;
pub mod agent;
pub mod declared;
pub mod fetch;
pub mod forget;
pub mod grant_renewal;
pub mod live;
pub mod metrics;
pub mod publish;
pub mod publish_intent;
mod record_hold;
pub mod seed;
pub mod share;
pub mod state;
pub mod trust;
pub mod tuning;
pub mod walk;

pub use activity::Activity;
pub use agent::{Agent, AgentOptions};
pub use declared::Declarations;
pub use fetch::FetchRequest;
pub use fetch::progress::{FetchProgress, FetchState, ProgressSnapshot};
pub use forget::Forgotten;
pub use metrics::Metrics;
pub use publish::{PublishRequest, PublishStarted, Published};
pub use seed::{SeedPolicy, SeedReport};
pub use share::{HeldShare, Role};
pub use trust::AgentTrust;
pub use walk::{SkipReason, Skipped, SkippedEntry};
