//! Publishes in progress, recorded so that a daemon stopped during a pass
//! (a crash, a rescheduled pod, an upgrade) finishes them when it starts
//! again: the same share, version and key. Why it matters: a publish hands
//! out its share id and tickets before its pass, and recipients may be
//! following the pass (live shares). Without the record the pass was simply
//! gone: the tickets named a share that would never exist, and the
//! recipients' half-written files waited for nothing. With it, the resumed
//! pass is the same live share (the tickets stay valid, a follower picks it
//! up again and keeps every chunk it verified: content-defined cuts and
//! convergent keys make the same chunks of the same data).
//!
//! Only publishes asked for through the admin API are recorded; declared
//! shares have their own record (the declaration) and publish again anyway.
//! A publish that keeps stopping its daemon is not resumed for ever: after
//! [`MAX_RESUMPTIONS`] it is dropped with a warning
//! (`caravan_errors_total{kind="publish_given_up"}`). The record holds the
//! share key only wrapped for the agent itself, like a held share's state.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::identity::wrap_key;
use crate::manifest::ShareId;
use crate::node::agent::Agent;
use crate::node::publish::{NewVersion, PublishRequest, PublishStarted, Published};
use crate::node::state;
use crate::util::unix_now;

/// Starts of a recorded publish (the first included) after which it is
/// dropped instead of resumed again.
pub const MAX_RESUMPTIONS: u32 = 3;

/// Waits before each further try to remove a finished publish's record
/// the storage refused to remove: about an hour in all.
#[cfg(not(test))]
const FORGET_RETRY_WAITS: &[Duration] = &[
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(300),
    Duration::from_secs(600),
    Duration::from_secs(900),
    Duration::from_secs(1200),
];
#[cfg(test)]
const FORGET_RETRY_WAITS: &[Duration] = &[Duration::from_millis(50); 40];

/// `<prefix>publishes/<share hex>.json`: one publish whose pass is running.
#[derive(Debug, Serialize, Deserialize)]
struct PublishIntent {
    /// The request as asked (its `share_id` as asked, too).
    request: PublishRequest,
    /// The version being made.
    share_id: ShareId,
    seq: u64,
    /// The share key of this version, wrapped for this agent (base64).
    wrapped_key: String,
    /// When it was first asked for (unix seconds).
    since: u64,
    /// Times a starting daemon resumed it.
    resumed: u32,
}

impl Agent {
    /// Publishes like [`Agent::publish_with`], with the publish recorded
    /// until its pass ends, so a daemon that stops meanwhile finishes it.
    pub async fn publish_resumable(
        &self,
        req: PublishRequest,
        started_tx: Option<tokio::sync::oneshot::Sender<PublishStarted>>,
    ) -> Result<Published> {
        let req = req.without_repeats();
        if req.offline_seeding {
            self.check_presigns().await?;
        }
        let v = self.new_version(&req)?;
        let intent = PublishIntent {
            request: req.clone(),
            share_id: v.share_id,
            seq: v.seq,
            wrapped_key: data_encoding::BASE64.encode(&wrap_key(&self.id, &v.key)?),
            since: unix_now(),
            resumed: 0,
        };
        // Live first: that is where a second pass of the share is refused,
        // before its record could replace the running one's.
        let live = self.go_live(&req, &v)?;
        if let Err(e) = self.save_intent(&intent).await {
            live.end(crate::node::live::LiveEnd::Failed(e.to_string()));
            self.linger(live, false);
            return Err(e);
        }
        let out = self.publish_version(&req, &v, live, None, started_tx).await;
        self.forget_publish(&v.share_id, &intent.wrapped_key).await;
        out
    }

    async fn save_intent(&self, intent: &PublishIntent) -> Result<()> {
        let path = state::publish_file(&self.opts.state_prefix, &intent.share_id);
        let json = serde_json::to_vec(intent).map_err(|e| Error::Config(e.to_string()))?;
        self.op
            .write(&path, json)
            .await
            .context(|| format!("saving {path}"))?;
        Ok(())
    }

    /// Drops the record of a publish whose pass ended (either way). When
    /// the storage refuses (the outage that failed the publish, often),
    /// the removal is tried again in the background for a while: a record
    /// left behind would have the next start resume a publish its user was
    /// told had failed. Only that record (`wrapped_key`, fresh randomness
    /// at each publish, tells it): a later publish's record written
    /// meanwhile under the same name stays.
    async fn forget_publish(&self, id: &ShareId, wrapped_key: &str) {
        let path = state::publish_file(&self.opts.state_prefix, id);
        let Err(e) = self.op.delete(&path).await else {
            return;
        };
        tracing::warn!(%path, error = %e, "could not drop a finished publish's record; trying again in the background");
        let op = self.op.clone();
        let wrapped_key = wrapped_key.to_string();
        tokio::spawn(async move {
            for wait in FORGET_RETRY_WAITS {
                tokio::time::sleep(*wait).await;
                match op.read(&path).await {
                    Ok(b) => {
                        let ours = serde_json::from_slice::<PublishIntent>(&b.to_vec())
                            .map(|i| i.wrapped_key == wrapped_key)
                            .unwrap_or(true);
                        if !ours {
                            return;
                        }
                    }
                    Err(e) if e.kind() == opendal::ErrorKind::NotFound => return,
                    Err(_) => continue,
                }
                if op.delete(&path).await.is_ok() {
                    tracing::info!(%path, "dropped a finished publish's record");
                    return;
                }
            }
            tracing::warn!(%path, "could not drop a finished publish's record: the next start resumes that publish");
        });
    }

    /// Resumes, in the background, every publish whose pass a stopped
    /// daemon left unfinished; returns how many. Each is live again when
    /// this returns (recipients asking get its pass, not "unknown share").
    pub async fn resume_publishes(self: &Arc<Self>) -> Result<usize> {
        let dir = state::publishes_dir(&self.opts.state_prefix);
        let found = state::read_each(&self.op, &dir, ".json", "publish record", |b| {
            serde_json::from_slice::<PublishIntent>(b)
        })
        .await?;
        let mut resumed = 0;
        for (path, mut intent) in found {
            let id = intent.share_id;
            // The record is named after its share: one read under another
            // name is not ours to act on.
            if path != state::publish_file(&self.opts.state_prefix, &id) {
                tracing::warn!(%path, "ignoring a publish record under another share's name");
                continue;
            }
            if self.share(&id).is_some_and(|s| s.seq() >= intent.seq) {
                // Its manifest was installed; only the record's removal was lost.
                self.forget_publish(&id, &intent.wrapped_key).await;
                continue;
            }
            if intent.resumed + 1 >= MAX_RESUMPTIONS {
                self.metrics.error("publish_given_up");
                tracing::warn!(share = %id, seq = intent.seq, path = %intent.request.path, starts = intent.resumed + 1,
                    "a publish interrupted at every start is not resumed again; publish it anew");
                self.forget_publish(&id, &intent.wrapped_key).await;
                continue;
            }
            let key = match data_encoding::BASE64
                .decode(intent.wrapped_key.as_bytes())
                .map_err(|e| Error::parse("wrapped key", e))
                .and_then(|w| self.key.unwrap_key(&w))
            {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(share = %id, error = %e, "dropping a publish record whose key does not open");
                    self.forget_publish(&id, &intent.wrapped_key).await;
                    continue;
                }
            };
            let v = match crate::node::state::user_path(
                &self.opts.state_prefix,
                &intent.request.path,
            ) {
                // The key was picked when the pass began; what it
                // removed was reported then.
                Ok(path) => NewVersion {
                    share_id: id,
                    seq: intent.seq,
                    key,
                    path,
                    removed: Vec::new(),
                    key_rotated: false,
                },
                Err(e) => {
                    tracing::warn!(share = %id, error = %e, "dropping a publish record with a bad path");
                    self.forget_publish(&id, &intent.wrapped_key).await;
                    continue;
                }
            };
            intent.resumed += 1;
            self.save_intent(&intent).await?;
            let req = intent.request;
            let live = match self.go_live(&req, &v) {
                Ok(live) => live,
                Err(e) => {
                    tracing::warn!(share = %id, error = %e, "not resuming a publish");
                    continue;
                }
            };
            tracing::info!(share = %id, seq = v.seq, path = %req.path, "resuming a publish a stopped daemon left unfinished");
            let agent = self.clone();
            let wrapped_key = intent.wrapped_key;
            tokio::spawn(async move {
                match agent.publish_version(&req, &v, live, None, None).await {
                    Ok(p) => {
                        tracing::info!(share = %id, seq = p.seq, files = p.files, "resumed publish done")
                    }
                    Err(e) => {
                        agent.metrics.error("publish");
                        tracing::error!(share = %id, error = %e, "resumed publish failed");
                    }
                }
                agent.forget_publish(&id, &wrapped_key).await;
            });
            resumed += 1;
        }
        Ok(resumed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent over a temporary folder holding `docs/a.txt`.
    async fn agent_with_docs() -> (tempfile::TempDir, Arc<Agent>) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("docs")).unwrap();
        std::fs::write(root.join("docs/a.txt"), b"hello").unwrap();
        let op = crate::store::open_local(root).unwrap();
        let agent = Agent::for_test(op, Some(root.to_path_buf())).await;
        (tmp, agent)
    }

    async fn write_intent(
        agent: &Agent,
        path: &str,
        resumed: u32,
    ) -> (ShareId, std::path::PathBuf) {
        let v = agent
            .new_version(&PublishRequest {
                path: path.into(),
                ..Default::default()
            })
            .unwrap();
        let intent = PublishIntent {
            request: PublishRequest {
                path: path.into(),
                ..Default::default()
            },
            share_id: v.share_id,
            seq: v.seq,
            wrapped_key: data_encoding::BASE64.encode(&wrap_key(&agent.id, &v.key).unwrap()),
            since: unix_now(),
            resumed,
        };
        agent.save_intent(&intent).await.unwrap();
        let file = agent
            .opts
            .fs_root
            .clone()
            .unwrap()
            .join(state::publish_file(&agent.opts.state_prefix, &v.share_id));
        (v.share_id, file)
    }

    /// A recorded publish is resumed under its own share id and version;
    /// one that was already resumed up to the bound is dropped instead (a
    /// publish that kills its daemon must not do so at every start); a
    /// record whose key does not open is dropped.
    #[tokio::test]
    async fn recorded_publishes_resume_a_bounded_number_of_times() {
        let (_tmp, agent) = agent_with_docs().await;
        let (fresh, fresh_file) = write_intent(&agent, "docs", 0).await;
        let (tired, tired_file) = write_intent(&agent, "docs", MAX_RESUMPTIONS - 1).await;
        let (bad, bad_file) = write_intent(&agent, "docs", 0).await;
        let mut broken: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&bad_file).unwrap()).unwrap();
        broken["wrapped_key"] = "AAAA".into();
        std::fs::write(&bad_file, serde_json::to_vec(&broken).unwrap()).unwrap();

        assert_eq!(agent.resume_publishes().await.unwrap(), 1);
        assert!(!tired_file.exists() && !bad_file.exists());
        for _ in 0..500 {
            if agent.share(&fresh).is_some() && !fresh_file.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let held = agent
            .share(&fresh)
            .expect("the resumed publish installed its share");
        assert_eq!(held.seq(), 1);
        assert!(
            !fresh_file.exists(),
            "a finished publish's record is dropped"
        );
        assert!(agent.share(&tired).is_none() && agent.share(&bad).is_none());
    }

    /// A finished publish's record the storage refused to remove is
    /// removed by a later try (else the next start would resume a publish
    /// its user was told had failed); a later publish's record written
    /// meanwhile under the same name is left alone.
    #[tokio::test]
    async fn a_record_the_storage_would_not_drop_goes_later_and_only_it() {
        let (_tmp, agent) = agent_with_docs().await;
        let (id, file) = write_intent(&agent, "docs", 0).await;
        let bytes = std::fs::read(&file).unwrap();
        let wrapped = serde_json::from_slice::<PublishIntent>(&bytes)
            .unwrap()
            .wrapped_key;
        let refuse = || {
            std::fs::remove_file(&file).unwrap();
            std::fs::create_dir_all(file.join("in-the-way")).unwrap();
        };
        let heal = || {
            std::fs::remove_dir_all(&file).unwrap();
            std::fs::write(&file, &bytes).unwrap();
        };

        // Another publish's removal, refused, then the record back: left.
        refuse();
        agent.forget_publish(&id, "another publish's key").await;
        assert!(file.is_dir(), "the storage was to refuse the removal");
        heal();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(file.is_file(), "a later publish's record was removed");

        // Its own removal, refused, then possible: done by a later try.
        refuse();
        agent.forget_publish(&id, &wrapped).await;
        heal();
        for _ in 0..300 {
            if !file.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            !file.exists(),
            "the record stayed: the next start would resume it"
        );
    }

    /// A recipient named twice gets one ticket (it got two).
    #[tokio::test]
    async fn a_recipient_named_twice_gets_one_ticket() {
        let (_tmp, agent) = agent_with_docs().await;
        let bob = crate::identity::SecretKey::generate().unwrap().agent_id();
        let carol = crate::identity::SecretKey::generate().unwrap().agent_id();
        let out = agent
            .publish_resumable(
                PublishRequest {
                    path: "docs".into(),
                    access: crate::manifest::Access {
                        agents: vec![bob, carol, bob],
                        trust_depth: None,
                    },
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        let to: Vec<&str> = out.tickets.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(to, [bob.to_string(), carol.to_string()]);
    }

    /// Two publishes of one share racing: exactly one runs, the other is
    /// refused as bad input, and the share ends at the next version (never
    /// two manifests of one version). A running pass refuses a publish of
    /// its share even before the share exists.
    #[tokio::test]
    async fn two_publishes_of_one_share_at_once_run_one_pass() {
        let (_tmp, agent) = agent_with_docs().await;
        let first = agent
            .publish(
                PublishRequest {
                    path: "docs".into(),
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        let id: ShareId = first.share_id.parse().unwrap();
        let again = || PublishRequest {
            path: "docs".into(),
            share_id: Some(id),
            ..Default::default()
        };
        let (a, b) = tokio::join!(
            agent.publish_resumable(again(), None),
            agent.publish_resumable(again(), None)
        );
        let refused = [&a, &b]
            .iter()
            .filter(|r| r.as_ref().is_err_and(|e| e.is_bad_input()))
            .count();
        assert_eq!((a.is_ok() as u8 + b.is_ok() as u8, refused), (1, 1));
        assert_eq!(agent.share(&id).unwrap().seq(), 2);

        // A running pass of a share not installed yet (a first version
        // being resumed) refuses another publish of it too.
        let docs = || PublishRequest {
            path: "docs".into(),
            ..Default::default()
        };
        let v = agent.new_version(&docs()).unwrap();
        let live = agent.go_live(&docs(), &v).unwrap();
        let again = agent
            .publish(
                PublishRequest {
                    share_id: Some(v.share_id),
                    ..docs()
                },
                None,
            )
            .await;
        let again = again.err().map(|e| (e.is_bad_input(), e.to_string()));
        assert!(again.as_ref().is_some_and(|(bad, _)| *bad), "{again:?}");
        live.end(crate::node::live::LiveEnd::Failed("test".into()));
    }
}
