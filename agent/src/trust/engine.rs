//! The trust engine: answers "does A trust X within N hops, and by which
//! chain?" from the grants and revocations an agent knows.
//!
//! Rule: A trusts D when a chain A→B→…→D of grants exists in which every
//! grant is inside its validity window, not revoked, in scope, and every hop
//! is allowed by the hop before it. The root may vouch `max_hops` hops; a
//! grant with depth `d` lets its subject vouch `d` further hops, so a
//! subject's remaining budget is `min(budget_of_issuer - 1, d)`.
//!
//! Search: agents are interned to dense indexes, grants are indexed by
//! issuer, and a bucket queue visits agents in order of decreasing remaining
//! budget. An agent is expanded once, with the best budget any path gives it
//! (a path that reaches it with less budget can never reach further), which
//! also makes cycles harmless. Cost is linear in the grants reachable from
//! the root. A search answers every target at once, so it is cached per
//! (root, max_hops, scope) until the grants change or a grant it looked at
//! enters or leaves its validity window; repeated checks cost a look-up and
//! walking the chain back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::identity::AgentId;
use crate::record::SignedRecord;

use super::records::{
    GrantId, Invalid, MAX_CLOCK_SKEW_SECS, MAX_GRANT_VALIDITY_SECS, Reason, Revocation, TrustGrant,
};

/// Most grant records a peer may present as its proof chain. A chain is at
/// most 255 hops, but nobody needs more than a few; this bounds the work an
/// unauthenticated request can cause.
pub const MAX_PRESENTED_GRANTS: usize = 64;

/// One hop of a chain, enough to print it and to find the grant again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GrantRef {
    /// The grant's id.
    pub id: GrantId,
    /// Who vouched.
    pub issuer: AgentId,
    /// For whom.
    pub subject: AgentId,
    /// The depth the grant allowed.
    pub depth: u8,
    /// When the grant expires (so a caller knows how long the answer holds).
    pub not_after: u64,
}

/// A proof chain, root first: `chain[0].issuer` is the root and
/// `chain.last().subject` is the trusted agent.
pub type Chain = Vec<GrantRef>;

/// The revocations an agent knows about. A revocation only counts for a grant
/// of the same issuer, so a stranger cannot revoke somebody else's grant.
#[derive(Debug, Clone, Default)]
pub struct RevocationSet {
    set: HashSet<(AgentId, GrantId)>,
}

impl RevocationSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a revocation whose record was already verified and opened with
    /// [`Revocation::from_record`]. Returns true when it was new.
    pub fn insert(&mut self, rev: &Revocation) -> bool {
        self.set.insert((rev.issuer, rev.grant_id))
    }

    /// Verifies (signer = issuer) and adds a revocation record.
    pub fn insert_record(&mut self, rec: &SignedRecord) -> Result<bool, Invalid> {
        let rev = Revocation::from_record(rec)?;
        Ok(self.insert(&rev))
    }

    /// True when `issuer` revoked grant `id`.
    pub fn contains(&self, issuer: &AgentId, id: &GrantId) -> bool {
        self.set.contains(&(*issuer, *id))
    }

    /// How many revocations are known.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// True when no revocation is known.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

const NO_SCOPE: u32 = u32::MAX;
const NO_PARENT: u32 = u32::MAX;

/// Everything about a grant (cold data, looked at when building answers).
#[derive(Debug, Clone)]
struct Entry {
    issuer: u32,
    subject: u32,
    depth: u8,
    revoked: bool,
    scope: u32,
    not_before: u64,
    not_after: u64,
    seq: u64,
    id: GrantId,
    record: Option<SignedRecord>,
}

/// What a search needs of a grant, stored inline in the issuer's adjacency
/// list so a traversal reads contiguous memory (32 bytes per edge).
#[derive(Debug, Clone, Copy)]
struct Edge {
    not_before: u64,
    not_after: u64,
    subject: u32,
    scope: u32,
    grant: u32,
    depth: u8,
    revoked: bool,
}

impl Edge {
    fn of(e: &Entry, grant: u32) -> Self {
        Edge {
            not_before: e.not_before,
            not_after: e.not_after,
            subject: e.subject,
            scope: e.scope,
            grant,
            depth: e.depth,
            revoked: e.revoked,
        }
    }

    fn in_scope(&self, scope: u32) -> bool {
        !self.revoked && (self.scope == NO_SCOPE || self.scope == scope)
    }

    /// Same rule as [`TrustGrant::is_active`], on the compact edge.
    fn window_ok(&self, now: u64) -> bool {
        self.not_before <= now.saturating_add(MAX_CLOCK_SKEW_SECS)
            && now < self.not_after
            && self.not_after <= now.saturating_add(MAX_GRANT_VALIDITY_SECS)
    }

    /// The next instant after `now` at which [`Self::window_ok`] changes
    /// (u64::MAX: never again), so a cached search knows when it goes stale.
    fn next_flip(&self, now: u64) -> u64 {
        if now >= self.not_after {
            return u64::MAX; // expired for good
        }
        let starts = self.not_before.saturating_sub(MAX_CLOCK_SKEW_SECS);
        let close_enough = self.not_after.saturating_sub(MAX_GRANT_VALIDITY_SECS);
        if self.window_ok(now) {
            self.not_after
        } else {
            // Not yet usable: it becomes usable (or expires) at one of these.
            [starts, close_enough, self.not_after]
                .into_iter()
                .filter(|t| *t > now)
                .min()
                .unwrap_or(u64::MAX)
        }
    }
}

/// Recent full searches, keyed by (root, max_hops, scope). Any change to
/// the grants or revocations clears it; an entry also expires at the first
/// instant a grant it looked at enters or leaves its validity window.
#[derive(Debug, Default)]
struct SearchCache(Mutex<HashMap<(u32, u8, u32), Arc<Search>>>);

impl Clone for SearchCache {
    fn clone(&self) -> Self {
        SearchCache::default()
    }
}

const MAX_CACHED_SEARCHES: usize = 64;

/// The grants and revocations an agent knows, indexed for chain queries.
/// Only the newest grant (highest `seq`) per (issuer, subject) pair is kept:
/// re-issuing a grant replaces it.
#[derive(Debug, Clone, Default)]
pub struct TrustEngine {
    agents: Vec<AgentId>,
    agent_index: HashMap<AgentId, u32>,
    grants: Vec<Entry>,
    by_issuer: Vec<Vec<Edge>>,
    by_pair: HashMap<(u32, u32), u32>,
    by_id: HashMap<GrantId, u32>,
    scopes: Vec<String>,
    scope_index: HashMap<String, u32>,
    revocations: RevocationSet,
    cache: SearchCache,
}

/// What a search leaves behind: each reached agent's best remaining budget
/// (-1: not reached) and the grant that gave it.
#[derive(Debug)]
struct Search {
    best: Vec<i16>,
    parent: Vec<u32>,
    /// The search was done at this time…
    at: u64,
    /// …and holds until this time (exclusive).
    until: u64,
}

impl TrustEngine {
    /// An engine knowing nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many grants are held (one per issuer/subject pair).
    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }

    /// How many distinct agents appear in the grants.
    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    /// The revocations known to this engine (pass to [`verify_chain`]).
    pub fn revocations(&self) -> &RevocationSet {
        &self.revocations
    }

    fn intern(&mut self, id: &AgentId) -> u32 {
        if let Some(i) = self.agent_index.get(id) {
            return *i;
        }
        let i = self.agents.len() as u32;
        self.agents.push(*id);
        self.agent_index.insert(*id, i);
        self.by_issuer.push(Vec::new());
        i
    }

    fn intern_scope(&mut self, scope: &Option<String>) -> u32 {
        match scope {
            None => NO_SCOPE,
            Some(s) => {
                if let Some(i) = self.scope_index.get(s) {
                    return *i;
                }
                let i = self.scopes.len() as u32;
                self.scopes.push(s.clone());
                self.scope_index.insert(s.clone(), i);
                i
            }
        }
    }

    /// Verifies a grant record (signer = issuer, well formed) and adds it.
    /// Returns true when it was new or replaced an older grant for the pair;
    /// false when an equal or newer one was already known.
    pub fn add_grant_record(&mut self, rec: &SignedRecord) -> Result<bool, Invalid> {
        let g = TrustGrant::from_record(rec)?;
        Ok(self.insert(g, Some(rec.clone())))
    }

    /// Adds a grant that was already verified (for example read back from the
    /// agent's own state). Same return value as [`Self::add_grant_record`].
    pub fn add_grant(&mut self, grant: TrustGrant) -> bool {
        self.insert(grant, None)
    }

    fn insert(&mut self, g: TrustGrant, record: Option<SignedRecord>) -> bool {
        if g.issuer == g.subject || g.not_before >= g.not_after {
            return false;
        }
        let issuer = self.intern(&g.issuer);
        let subject = self.intern(&g.subject);
        let scope = self.intern_scope(&g.scope);
        let id = g.id();
        let entry = Entry {
            issuer,
            subject,
            depth: g.depth,
            revoked: self.revocations.contains(&g.issuer, &id),
            scope,
            not_before: g.not_before,
            not_after: g.not_after,
            seq: g.seq,
            id,
            record,
        };
        match self.by_pair.get(&(issuer, subject)) {
            Some(&gi) => {
                let old = &mut self.grants[gi as usize];
                if old.seq >= g.seq {
                    return false;
                }
                self.by_id.remove(&old.id);
                *old = entry;
                self.by_id.insert(id, gi);
                let edge = Edge::of(old, gi);
                if let Some(slot) = self.by_issuer[issuer as usize]
                    .iter_mut()
                    .find(|e| e.grant == gi)
                {
                    *slot = edge;
                }
            }
            None => {
                let gi = self.grants.len() as u32;
                self.by_issuer[issuer as usize].push(Edge::of(&entry, gi));
                self.grants.push(entry);
                self.by_pair.insert((issuer, subject), gi);
                self.by_id.insert(id, gi);
            }
        }
        self.invalidate();
        true
    }

    /// Verifies a revocation record (signer = issuer) and applies it.
    pub fn add_revocation_record(&mut self, rec: &SignedRecord) -> Result<bool, Invalid> {
        let rev = Revocation::from_record(rec)?;
        Ok(self.add_revocation(&rev))
    }

    /// Applies a verified revocation: the grant disappears from every chain,
    /// at once, and so does everything only reachable through it. Returns
    /// true when the revocation was new.
    pub fn add_revocation(&mut self, rev: &Revocation) -> bool {
        let new = self.revocations.insert(rev);
        if let Some(&gi) = self.by_id.get(&rev.grant_id) {
            let e = &mut self.grants[gi as usize];
            if self.agents[e.issuer as usize] == rev.issuer && !e.revoked {
                e.revoked = true;
                let issuer = e.issuer as usize;
                if let Some(slot) = self.by_issuer[issuer].iter_mut().find(|e| e.grant == gi) {
                    slot.revoked = true;
                }
                self.invalidate();
            }
        }
        new
    }

    /// The grants `issuer` has issued that this engine holds (for listing).
    pub fn grants_issued_by(&self, issuer: &AgentId) -> Vec<TrustGrant> {
        let Some(&i) = self.agent_index.get(issuer) else {
            return Vec::new();
        };
        self.by_issuer[i as usize]
            .iter()
            .map(|e| self.to_grant(&self.grants[e.grant as usize]))
            .collect()
    }

    /// Every grant held as a signed record (to explain a refusal by
    /// re-checking them as a presented proof would be).
    pub fn grant_records(&self) -> Vec<SignedRecord> {
        self.grants
            .iter()
            .filter_map(|e| e.record.clone())
            .collect()
    }

    /// The grant with this id, with its signed record when it was added as one.
    pub fn grant(&self, id: &GrantId) -> Option<(TrustGrant, Option<&SignedRecord>)> {
        let e = &self.grants[*self.by_id.get(id)? as usize];
        Some((self.to_grant(e), e.record.as_ref()))
    }

    /// True when the grant is known and revoked.
    pub fn is_revoked(&self, id: &GrantId) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|&gi| self.grants[gi as usize].revoked)
    }

    fn to_grant(&self, e: &Entry) -> TrustGrant {
        TrustGrant {
            issuer: self.agents[e.issuer as usize],
            subject: self.agents[e.subject as usize],
            depth: e.depth,
            scope: (e.scope != NO_SCOPE).then(|| self.scopes[e.scope as usize].clone()),
            not_before: e.not_before,
            not_after: e.not_after,
            seq: e.seq,
        }
    }

    /// Resolves a query scope: None means "general trust", which only
    /// unscoped grants give; Some(s) also accepts grants scoped to `s`.
    /// A scope no grant mentions resolves to an id no grant carries.
    fn resolve_scope(&self, scope: Option<&str>) -> u32 {
        match scope {
            None => NO_SCOPE - 1,
            Some(s) => self.scope_index.get(s).copied().unwrap_or(NO_SCOPE - 1),
        }
    }

    /// Drops cached searches (they are also dropped on every change). For
    /// benchmarks measuring cold checks, and to release memory.
    pub fn clear_cache(&self) {
        if let Ok(mut c) = self.cache.0.lock() {
            c.clear();
        }
    }

    fn invalidate(&mut self) {
        if let Ok(c) = self.cache.0.get_mut() {
            c.clear();
        }
    }

    /// A full search from `root`, from the cache when one is still valid at
    /// `now`, otherwise computed and cached.
    fn search_cached(&self, root: u32, max_hops: u8, now: u64, scope: u32) -> Arc<Search> {
        let key = (root, max_hops, scope);
        if let Ok(c) = self.cache.0.lock()
            && let Some(s) = c.get(&key)
            && s.at <= now
            && now < s.until
        {
            return s.clone();
        }
        let s = Arc::new(self.search(root, max_hops, now, scope));
        if let Ok(mut c) = self.cache.0.lock() {
            if c.len() >= MAX_CACHED_SEARCHES {
                c.clear();
            }
            c.insert(key, s.clone());
        }
        s
    }

    fn search(&self, root: u32, max_hops: u8, now: u64, scope: u32) -> Search {
        let n = self.agents.len();
        let mut best = vec![-1i16; n];
        let mut parent = vec![NO_PARENT; n];
        let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); max_hops as usize + 1];
        let mut until = u64::MAX;
        best[root as usize] = max_hops as i16;
        buckets[max_hops as usize].push(root);
        for b in (1..=max_hops as usize).rev() {
            let mut queue = std::mem::take(&mut buckets[b]);
            for v in queue.drain(..) {
                if best[v as usize] as usize != b {
                    continue; // reached again later with a better budget
                }
                for e in &self.by_issuer[v as usize] {
                    if !e.in_scope(scope) {
                        continue;
                    }
                    until = until.min(e.next_flip(now));
                    if !e.window_ok(now) {
                        continue;
                    }
                    let w = e.subject as usize;
                    let nb = (b - 1).min(e.depth as usize) as i16;
                    if best[w] < nb {
                        best[w] = nb;
                        parent[w] = e.grant;
                        buckets[nb as usize].push(e.subject);
                    }
                }
            }
        }
        Search {
            best,
            parent,
            at: now,
            until,
        }
    }

    fn chain_to(&self, s: &Search, root: u32, target: u32) -> Option<Chain> {
        if s.best[target as usize] < 0 || target == root {
            return None;
        }
        let mut hops = Vec::new();
        let mut node = target;
        // Budgets strictly increase towards the root, so this ends within
        // max_hops steps; the bound is a guard against a logic error.
        for _ in 0..=u8::MAX as usize {
            if node == root {
                hops.reverse();
                return Some(hops);
            }
            let gi = s.parent[node as usize];
            if gi == NO_PARENT {
                return None;
            }
            let e = &self.grants[gi as usize];
            hops.push(GrantRef {
                id: e.id,
                issuer: self.agents[e.issuer as usize],
                subject: self.agents[e.subject as usize],
                depth: e.depth,
                not_after: e.not_after,
            });
            node = e.issuer;
        }
        None
    }

    /// Does `root` trust `target` within `max_hops` hops at time `now`
    /// (general trust: unscoped grants only)? Returns a proof chain, root
    /// first, or None. An agent does not "trust itself" through this call.
    pub fn chain(&self, root: &AgentId, target: &AgentId, max_hops: u8, now: u64) -> Option<Chain> {
        self.chain_in_scope(root, target, max_hops, now, None)
    }

    /// Like [`Self::chain`], also accepting grants scoped to `scope`.
    pub fn chain_in_scope(
        &self,
        root: &AgentId,
        target: &AgentId,
        max_hops: u8,
        now: u64,
        scope: Option<&str>,
    ) -> Option<Chain> {
        let r = *self.agent_index.get(root)?;
        let t = *self.agent_index.get(target)?;
        if r == t || max_hops == 0 {
            return None;
        }
        let s = self.search_cached(r, max_hops, now, self.resolve_scope(scope));
        self.chain_to(&s, r, t)
    }

    /// Everyone `root` trusts within `max_hops`, each with a proof chain:
    /// the "trust tree" (`trust list` prints it).
    pub fn trusted_set(&self, root: &AgentId, max_hops: u8, now: u64) -> BTreeMap<AgentId, Chain> {
        self.trusted_set_in_scope(root, max_hops, now, None)
    }

    /// Like [`Self::trusted_set`], also accepting grants scoped to `scope`.
    pub fn trusted_set_in_scope(
        &self,
        root: &AgentId,
        max_hops: u8,
        now: u64,
        scope: Option<&str>,
    ) -> BTreeMap<AgentId, Chain> {
        let mut out = BTreeMap::new();
        let Some(&r) = self.agent_index.get(root) else {
            return out;
        };
        if max_hops == 0 {
            return out;
        }
        let s = self.search_cached(r, max_hops, now, self.resolve_scope(scope));
        for (i, b) in s.best.iter().enumerate() {
            if *b >= 0
                && i as u32 != r
                && let Some(c) = self.chain_to(&s, r, i as u32)
            {
                out.insert(self.agents[i], c);
            }
        }
        out
    }

    /// Only the ids `root` trusts (cheaper than [`Self::trusted_set`] when the
    /// chains are not needed, e.g. to expand "trusted within depth N").
    pub fn trusted_ids(&self, root: &AgentId, max_hops: u8, now: u64) -> Vec<AgentId> {
        let Some(&r) = self.agent_index.get(root) else {
            return Vec::new();
        };
        if max_hops == 0 {
            return Vec::new();
        }
        let s = self.search_cached(r, max_hops, now, self.resolve_scope(None));
        s.best
            .iter()
            .enumerate()
            .filter(|(i, b)| **b >= 0 && *i as u32 != r)
            .map(|(i, _)| self.agents[i])
            .collect()
    }

    /// Decides whether `requester` may be served under "trusted within
    /// `max_hops`" (in `scope`): first from this engine's own view, then
    /// from the proof chain the requester presented (checked with
    /// [`verify_chain`] against the revocations this engine knows). This is
    /// the one call the peer protocol needs.
    pub fn authorize(
        &self,
        root: &AgentId,
        requester: &AgentId,
        max_hops: u8,
        scope: Option<&str>,
        presented: &[SignedRecord],
        now: u64,
    ) -> Result<Chain, Invalid> {
        if let Some(c) = self.chain_in_scope(root, requester, max_hops, now, scope) {
            return Ok(c);
        }
        verify_chain(
            root,
            requester,
            max_hops,
            scope,
            presented,
            &self.revocations,
            now,
        )
    }

    /// The signed grant records of a chain, to present to a peer. Hops added
    /// without a record (see [`Self::add_grant`]) are missing from the result,
    /// which the peer will then refuse; callers add grants as records when
    /// they intend to present them.
    pub fn proof(&self, chain: &[GrantRef]) -> Vec<SignedRecord> {
        chain
            .iter()
            .filter_map(|h| {
                let gi = *self.by_id.get(&h.id)?;
                self.grants[gi as usize].record.clone()
            })
            .collect()
    }
}

/// Checks a proof chain presented by a peer, without a global view: do the
/// presented grant records (in any order, at most [`MAX_PRESENTED_GRANTS`])
/// link `root` to `target` within `max_hops`, each grant verified, signed by
/// its issuer, inside its window, in `scope`, and not revoked as far as the
/// checker knows? Returns the chain used, or why not.
pub fn verify_chain(
    root: &AgentId,
    target: &AgentId,
    max_hops: u8,
    scope: Option<&str>,
    presented: &[SignedRecord],
    revocations: &RevocationSet,
    now: u64,
) -> Result<Chain, Invalid> {
    if presented.len() > MAX_PRESENTED_GRANTS {
        return Err(Invalid::new(
            Reason::Oversize,
            format!(
                "{} grants presented (limit {MAX_PRESENTED_GRANTS})",
                presented.len()
            ),
        ));
    }
    let mut engine = TrustEngine::new();
    let mut revoked = 0usize;
    for rec in presented {
        let g = TrustGrant::from_record(rec)?;
        if revocations.contains(&g.issuer, &g.id()) {
            revoked += 1;
            continue;
        }
        engine.insert(g, None);
    }
    engine
        .chain_in_scope(root, target, max_hops, now, scope)
        .ok_or_else(|| {
            let why = if revoked > 0 {
                format!("{revoked} presented grant(s) are revoked and no other chain remains")
            } else {
                "the presented grants do not link the root to the requester".to_string()
            };
            Invalid::new(
                if revoked > 0 {
                    Reason::Revoked
                } else {
                    Reason::Untrusted
                },
                format!(
                    "{} does not trust {} within {max_hops} hops: {why}",
                    root.short(),
                    target.short()
                ),
            )
        })
}

/// Renders a trusted set as an indented tree (root first, each agent under
/// the agent that vouched for it), for `trust list` and logs.
pub fn render_tree(root: &AgentId, set: &BTreeMap<AgentId, Chain>) -> String {
    let mut children: BTreeMap<AgentId, Vec<(AgentId, u8)>> = BTreeMap::new();
    for (who, chain) in set {
        if let Some(last) = chain.last() {
            children
                .entry(last.issuer)
                .or_default()
                .push((*who, last.depth));
        }
    }
    let mut out = format!("{root}\n");
    // Iterative depth-first walk; every agent appears once (set keys are unique).
    let mut stack: Vec<(AgentId, u8, usize)> = children
        .get(root)
        .map(|c| c.iter().rev().map(|(a, d)| (*a, *d, 1)).collect())
        .unwrap_or_default();
    let mut printed = 0usize;
    while let Some((who, depth, level)) = stack.pop() {
        printed += 1;
        if printed > set.len() {
            break;
        }
        out.push_str(&"  ".repeat(level));
        out.push_str(&format!("└ {who} (may vouch {depth} more)\n"));
        if let Some(c) = children.get(&who) {
            stack.extend(c.iter().rev().map(|(a, d)| (*a, *d, level + 1)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use proptest::prelude::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }
    fn id(n: u8) -> AgentId {
        key(n).agent_id()
    }

    fn grant(i: u8, s: u8, depth: u8) -> TrustGrant {
        TrustGrant {
            issuer: id(i),
            subject: id(s),
            depth,
            scope: None,
            not_before: 0,
            not_after: 10_000,
            seq: 1,
        }
    }

    fn signed(i: u8, s: u8, depth: u8) -> SignedRecord {
        SignedRecord::seal(&key(i), &grant(i, s, depth)).unwrap()
    }

    fn revoke(e: &mut TrustEngine, i: u8, s: u8) {
        let g = grant(i, s, 0);
        e.add_revocation(&Revocation {
            issuer: id(i),
            grant_id: g.id(),
            seq: 1,
            revoked_at: 5,
        });
    }

    #[test]
    fn engine_and_client_can_be_shared_across_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<TrustEngine>();
        shareable::<RevocationSet>();
    }

    #[test]
    fn depth_example_from_the_design() {
        // A→B depth 2, B→C depth 1, C→D depth 0, D→E depth 5.
        let mut e = TrustEngine::new();
        for (i, s, d) in [(1, 2, 2), (2, 3, 1), (3, 4, 0), (4, 5, 5)] {
            assert!(e.add_grant_record(&signed(i, s, d)).unwrap());
        }
        let c = e.chain(&id(1), &id(4), 10, 100).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].issuer, id(1));
        assert_eq!(c[2].subject, id(4));
        assert!(e.chain(&id(1), &id(5), 10, 100).is_none());
        // max_hops limits too
        assert!(e.chain(&id(1), &id(4), 2, 100).is_none());
        assert!(e.chain(&id(1), &id(3), 2, 100).is_some());
        let set = e.trusted_set(&id(1), 10, 100);
        assert_eq!(set.len(), 3);
        let tree = render_tree(&id(1), &set);
        assert_eq!(tree.lines().count(), 4);
        // proof verifies without the engine
        let proof = e.proof(&c);
        assert_eq!(proof.len(), 3);
        let v = verify_chain(&id(1), &id(4), 10, None, &proof, &RevocationSet::new(), 100).unwrap();
        assert_eq!(v, c);
    }

    #[test]
    fn revocation_prunes_subtree_but_other_paths_survive() {
        let mut e = TrustEngine::new();
        // 1→2→3→4 and 1→5→4
        for (i, s) in [(1, 2), (2, 3), (3, 4), (1, 5), (5, 4)] {
            e.add_grant_record(&signed(i, s, 5)).unwrap();
        }
        revoke(&mut e, 1, 2);
        assert!(e.chain(&id(1), &id(2), 5, 100).is_none());
        assert!(e.chain(&id(1), &id(3), 5, 100).is_none());
        let c = e.chain(&id(1), &id(4), 5, 100).unwrap();
        assert_eq!(c[0].subject, id(5));
        // a revocation by someone else than the issuer does nothing
        let mut e2 = TrustEngine::new();
        e2.add_grant_record(&signed(1, 2, 1)).unwrap();
        e2.add_revocation(&Revocation {
            issuer: id(9),
            grant_id: grant(1, 2, 0).id(),
            seq: 1,
            revoked_at: 1,
        });
        assert!(e2.chain(&id(1), &id(2), 5, 100).is_some());
        // verify_chain rejects a presented revoked grant
        let proof = vec![signed(1, 2, 5), signed(2, 3, 5)];
        let err = verify_chain(&id(1), &id(3), 5, None, &proof, e.revocations(), 100).unwrap_err();
        assert_eq!(err.reason, Reason::Revoked);
        // authorize: local view first, then the presented proof
        let mut fresh = TrustEngine::new();
        assert!(fresh.authorize(&id(1), &id(3), 5, None, &[], 100).is_err());
        assert_eq!(
            fresh
                .authorize(&id(1), &id(3), 5, None, &proof, 100)
                .unwrap()
                .len(),
            2
        );
        fresh.add_revocation(&Revocation {
            issuer: id(2),
            grant_id: grant(2, 3, 0).id(),
            seq: 1,
            revoked_at: 1,
        });
        assert_eq!(
            fresh
                .authorize(&id(1), &id(3), 5, None, &proof, 100)
                .unwrap_err()
                .reason,
            Reason::Revoked
        );
    }

    #[test]
    fn cycles_windows_and_scopes() {
        let mut e = TrustEngine::new();
        for (i, s) in [(1, 2), (2, 3), (3, 1), (3, 2)] {
            e.add_grant_record(&signed(i, s, 9)).unwrap();
        }
        assert_eq!(e.trusted_set(&id(1), 9, 100).len(), 2);
        assert!(e.chain(&id(1), &id(3), 9, 20_000).is_none()); // expired
        let scoped = TrustGrant {
            scope: Some("photos".into()),
            ..grant(3, 4, 0)
        };
        e.add_grant_record(&SignedRecord::seal(&key(3), &scoped).unwrap())
            .unwrap();
        assert!(e.chain(&id(1), &id(4), 9, 100).is_none());
        assert!(
            e.chain_in_scope(&id(1), &id(4), 9, 100, Some("photos"))
                .is_some()
        );
        assert!(
            e.chain_in_scope(&id(1), &id(4), 9, 100, Some("music"))
                .is_none()
        );
        // newer seq replaces; older does not
        let newer = TrustGrant {
            seq: 2,
            depth: 0,
            ..grant(1, 2, 0)
        };
        assert!(e.add_grant(newer));
        assert!(!e.add_grant(grant(1, 2, 9)));
        assert!(e.chain(&id(1), &id(3), 9, 100).is_none());
    }

    #[test]
    fn verify_chain_rejects_bad_presentations() {
        let rs = RevocationSet::new();
        // a forged hop: 2 claims 1 vouched for it
        let forged = SignedRecord::seal(&key(2), &grant(1, 2, 1)).unwrap();
        assert_eq!(
            verify_chain(&id(1), &id(2), 3, None, &[forged], &rs, 100)
                .unwrap_err()
                .reason,
            Reason::WrongSigner
        );
        // a broken chain
        let err = verify_chain(&id(1), &id(3), 3, None, &[signed(2, 3, 1)], &rs, 100).unwrap_err();
        assert_eq!(err.reason, Reason::Untrusted);
        let many = vec![signed(1, 2, 1); MAX_PRESENTED_GRANTS + 1];
        assert_eq!(
            verify_chain(&id(1), &id(2), 3, None, &many, &rs, 100)
                .unwrap_err()
                .reason,
            Reason::Oversize
        );
    }

    // ---- property tests against an obviously-correct reference ----

    #[derive(Debug, Clone)]
    struct G {
        i: u8,
        s: u8,
        depth: u8,
        not_before: u64,
        not_after: u64,
        seq: u64,
        scoped: bool,
    }

    fn ids() -> Vec<AgentId> {
        (0..8u8).map(|n| AgentId([n; 32])).collect()
    }

    fn to_grant(g: &G, ids: &[AgentId]) -> TrustGrant {
        TrustGrant {
            issuer: ids[g.i as usize],
            subject: ids[g.s as usize],
            depth: g.depth,
            scope: g.scoped.then(|| "s".to_string()),
            not_before: g.not_before,
            not_after: g.not_after,
            seq: g.seq,
        }
    }

    /// The reference: keep the newest grant per pair, drop revoked, expired
    /// and out-of-scope ones, then enumerate every simple path from the root.
    fn reference(
        grants: &[G],
        revoked: &[usize],
        root: u8,
        max_hops: u8,
        now: u64,
        scope: Option<&str>,
    ) -> BTreeMap<u8, ()> {
        let ids = ids();
        let mut newest: BTreeMap<(u8, u8), &G> = BTreeMap::new();
        for g in grants {
            if g.i == g.s || g.not_before >= g.not_after {
                continue;
            }
            match newest.get(&(g.i, g.s)) {
                Some(old) if old.seq >= g.seq => {}
                _ => {
                    newest.insert((g.i, g.s), g);
                }
            }
        }
        let revoked_ids: Vec<GrantId> = revoked
            .iter()
            .filter_map(|&k| grants.get(k))
            .map(|g| to_grant(g, &ids).id())
            .collect();
        let usable: Vec<&G> = newest
            .values()
            .copied()
            .filter(|g| {
                let tg = to_grant(g, &ids);
                tg.is_active(now)
                    && !revoked_ids.contains(&tg.id())
                    && (!g.scoped || scope == Some("s"))
            })
            .collect();
        let mut out = BTreeMap::new();
        fn dfs(v: u8, budget: u8, path: &mut Vec<u8>, usable: &[&G], out: &mut BTreeMap<u8, ()>) {
            if budget == 0 {
                return;
            }
            for g in usable.iter().filter(|g| g.i == v) {
                if path.contains(&g.s) {
                    continue;
                }
                out.insert(g.s, ());
                path.push(g.s);
                dfs(g.s, (budget - 1).min(g.depth), path, usable, out);
                path.pop();
            }
        }
        dfs(root, max_hops, &mut vec![root], &usable, &mut out);
        out.remove(&root);
        out
    }

    /// Independent check that a chain returned by the engine is valid.
    fn chain_is_valid(
        c: &Chain,
        root: &AgentId,
        target: &AgentId,
        max_hops: u8,
        e: &TrustEngine,
        now: u64,
    ) -> bool {
        if c.is_empty()
            || c.len() > max_hops as usize
            || c[0].issuer != *root
            || c.last().map(|h| h.subject) != Some(*target)
        {
            return false;
        }
        let mut budget = max_hops as usize;
        let mut at = *root;
        for h in c {
            let Some((g, _)) = e.grant(&h.id) else {
                return false;
            };
            if g.issuer != at || budget == 0 || !g.is_active(now) || e.is_revoked(&h.id) {
                return false;
            }
            budget = (budget - 1).min(g.depth as usize);
            at = g.subject;
        }
        true
    }

    fn graph() -> impl Strategy<Value = (Vec<G>, Vec<usize>)> {
        let g = (
            0u8..8,
            0u8..8,
            0u8..4,
            0u64..40,
            0u64..120,
            0u64..3,
            proptest::bool::weighted(0.15),
        )
            .prop_map(|(i, s, depth, nb, len, seq, scoped)| G {
                i,
                s,
                depth,
                not_before: nb,
                not_after: nb + len,
                seq,
                scoped,
            });
        (
            proptest::collection::vec(g, 0..30),
            proptest::collection::vec(0usize..30, 0..5),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn engine_matches_reference((grants, revoked) in graph(), root in 0u8..8, max_hops in 0u8..6, nows in proptest::collection::vec(0u64..130, 1..5), scoped_query in any::<bool>()) {
            let ids = ids();
            let mut e = TrustEngine::new();
            // interleave: revocations before and after the grants they name
            let (early, late) = revoked.split_at(revoked.len() / 2);
            for &k in early {
                if let Some(g) = grants.get(k) {
                    let tg = to_grant(g, &ids);
                    e.add_revocation(&Revocation { issuer: tg.issuer, grant_id: tg.id(), seq: 0, revoked_at: 0 });
                    // a stranger "revoking" the same grant has no effect
                    let stranger = ids[((g.i + 1) % 8) as usize];
                    e.add_revocation(&Revocation { issuer: stranger, grant_id: tg.id(), seq: 0, revoked_at: 0 });
                }
            }
            for g in &grants {
                e.add_grant(to_grant(g, &ids));
            }
            for &k in late {
                if let Some(g) = grants.get(k) {
                    let tg = to_grant(g, &ids);
                    e.add_revocation(&Revocation { issuer: tg.issuer, grant_id: tg.id(), seq: 0, revoked_at: 0 });
                }
            }
            // several instants against the same engine: exercises the
            // time-bounded search cache (including time going backwards)
            for now in nows {
            let scope = scoped_query.then_some("s");
            let want = reference(&grants, &revoked, root, max_hops, now, scope);
            let set = e.trusted_set_in_scope(&ids[root as usize], max_hops, now, scope);
            let got: BTreeMap<u8, ()> = set.keys().map(|a| (a.0[0], ())).collect();
            prop_assert_eq!(&got, &want);
            for t in 0u8..8 {
                let c = e.chain_in_scope(&ids[root as usize], &ids[t as usize], max_hops, now, scope);
                prop_assert_eq!(c.is_some(), want.contains_key(&t), "target {}", t);
                if let Some(c) = c {
                    prop_assert!(chain_is_valid(&c, &ids[root as usize], &ids[t as usize], max_hops, &e, now));
                }
            }
            if !scoped_query {
                let mut only: Vec<u8> = e.trusted_ids(&ids[root as usize], max_hops, now).iter().map(|a| a.0[0]).collect();
                only.sort();
                prop_assert_eq!(only, want.keys().copied().collect::<Vec<_>>());
            }
            }
        }
    }

    /// verify_chain over signed records agrees with the engine on the
    /// records presented (real keys, so fewer cases).
    #[test]
    fn verify_chain_matches_engine_on_random_graphs() {
        use proptest::test_runner::{Config, TestRunner};
        let keys: Vec<SecretKey> = (1..=6u8).map(key).collect();
        let mut runner = TestRunner::new(Config::with_cases(60));
        runner
            .run(
                &(
                    proptest::collection::vec((0usize..6, 0usize..6, 0u8..3), 0..12),
                    0usize..6,
                    0usize..6,
                    1u8..5,
                ),
                |(edges, root, target, hops)| {
                    let mut e = TrustEngine::new();
                    let mut recs = Vec::new();
                    for (i, s, d) in edges {
                        if i == s {
                            continue;
                        }
                        let g = TrustGrant {
                            issuer: keys[i].agent_id(),
                            subject: keys[s].agent_id(),
                            depth: d,
                            scope: None,
                            not_before: 0,
                            not_after: 1000,
                            seq: 1,
                        };
                        let r = SignedRecord::seal(&keys[i], &g).unwrap();
                        e.add_grant_record(&r).unwrap();
                        recs.push(r);
                    }
                    let (r, t) = (keys[root].agent_id(), keys[target].agent_id());
                    let direct = e.chain(&r, &t, hops, 10);
                    let presented =
                        verify_chain(&r, &t, hops, None, &recs, &RevocationSet::new(), 10);
                    prop_assert_eq!(direct.is_some(), presented.is_ok());
                    if let Some(c) = direct {
                        let proof = e.proof(&c);
                        prop_assert!(
                            verify_chain(&r, &t, hops, None, &proof, &RevocationSet::new(), 10)
                                .is_ok()
                        );
                    }
                    Ok(())
                },
            )
            .unwrap();
    }
}
