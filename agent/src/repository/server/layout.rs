//! Where the repository keeps what, in its storage (the table is in the
//! module docs of [`super`]).

use opendal::ErrorKind;

use crate::identity::AgentId;
use crate::trust::GrantId;
use crate::util::hex;

pub(super) fn is_not_found(e: &opendal::Error) -> bool {
    e.kind() == ErrorKind::NotFound
}

pub(super) fn announcement_path(agent: &AgentId) -> String {
    format!("records/announcement/{}", hex(&agent.0))
}
pub(super) fn grant_path(issuer: &AgentId, subject: &AgentId) -> String {
    format!("records/grant/{}/{}", hex(&issuer.0), hex(&subject.0))
}
pub(super) fn revocation_path(issuer: &AgentId, id: &GrantId) -> String {
    format!("records/revocation/{}/{}", hex(&issuer.0), id.to_hex())
}
pub(super) fn locator_marker(locator: &[u8; 32], agent: &AgentId) -> String {
    format!("index/locator/{}/{}", hex(locator), hex(&agent.0))
}
pub(super) fn subject_marker(subject: &AgentId, issuer: &AgentId) -> String {
    format!("index/grant-subject/{}/{}", hex(&subject.0), hex(&issuer.0))
}
/// Empty marker: a grant with this id was stored (revocations must name one).
pub(super) fn grant_id_marker(issuer: &AgentId, id: &GrantId) -> String {
    format!("index/grant-id/{}/{}", hex(&issuer.0), id.to_hex())
}
pub(super) fn issuer_grants_prefix(issuer: &AgentId) -> String {
    format!("records/grant/{}/", hex(&issuer.0))
}
pub(super) fn subject_index_prefix(subject: &AgentId) -> String {
    format!("index/grant-subject/{}/", hex(&subject.0))
}
pub(super) fn feed_path(n: u64) -> String {
    format!("feed/{n:020}")
}
pub(super) fn seed_path(publisher: &AgentId, share: &[u8; 32]) -> String {
    format!("records/seed/{}/{}", hex(&publisher.0), hex(share))
}
pub(super) fn publisher_seeds_prefix(publisher: &AgentId) -> String {
    format!("records/seed/{}/", hex(&publisher.0))
}
