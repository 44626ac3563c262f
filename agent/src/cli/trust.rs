//! `trust`: grants, revocations and questions, through the admin API.

use anyhow::{Result, bail};

use caravan_agent::daemon::api;

use crate::cli::args::TrustCommand;
use crate::cli::client::Admin;

pub(crate) async fn command(action: TrustCommand) -> Result<()> {
    use caravan_agent::daemon::api::{
        GrantInfo, GrantRequest, RevokeRequest, TrustListing, WhyAnswer,
    };
    match action {
        TrustCommand::Grant {
            config,
            agent,
            depth,
            expires,
            scope,
            json,
        } => {
            let req = GrantRequest {
                subject: agent,
                depth,
                expires_secs: expires,
                scope,
            };
            // The daemon checks it again (400); refused here, nothing is sent.
            req.check()?;
            let g: GrantInfo = Admin::from_config(&config)?
                .post(api::TRUST_GRANTS, &req)
                .await?;
            if json {
                out!("{}", serde_json::to_string(&g)?);
            } else {
                out!(
                    "granted {} depth {} until {} (grant {}); published to {}",
                    g.subject,
                    g.depth,
                    crate::cli::human::date(g.not_after),
                    g.grant_id,
                    if g.published_to.is_empty() {
                        "no repository (none configured)".to_string()
                    } else {
                        g.published_to.join(", ")
                    }
                );
            }
            Ok(())
        }
        TrustCommand::Revoke {
            config,
            agent,
            grant_id,
            json,
        } => {
            let r: api::RevokeResponse = Admin::from_config(&config)?
                .post(
                    api::TRUST_REVOCATIONS,
                    &RevokeRequest {
                        subject: agent,
                        grant_id,
                    },
                )
                .await?;
            if json {
                out!("{}", serde_json::to_string(&r)?);
            } else {
                for id in &r.revoked {
                    out!("revoked grant {id}");
                }
                if !r.published_to.is_empty() {
                    out!("published to {}", r.published_to.join(", "));
                }
                for refusal in &r.refused {
                    out!("refused (not retried): {refusal}");
                }
                if !r.pending.is_empty() {
                    out!(
                        "{} in effect on this agent; not yet published to {} (unreachable): \
                         saved, and it will be published when {} answers",
                        if r.revoked.len() == 1 {
                            "the revocation is"
                        } else {
                            "the revocations are"
                        },
                        r.pending.join(", "),
                        if r.pending.len() == 1 { "it" } else { "each" }
                    );
                }
            }
            Ok(())
        }
        TrustCommand::List { config, json } => {
            let l: TrustListing = Admin::from_config(&config)?.get(api::TRUST).await?;
            if json {
                out!("{}", serde_json::to_string(&l)?);
            } else {
                out!("grants issued by {}:", l.agent_id);
                for g in &l.issued {
                    out!(
                        "  {} -> {} depth {}{}{} (grant {})",
                        g.issuer.short(),
                        g.subject,
                        g.depth,
                        g.scope
                            .as_ref()
                            .map(|s| format!(" scope {s}"))
                            .unwrap_or_default(),
                        if g.revoked { " REVOKED" } else { "" },
                        g.grant_id
                    );
                }
                out!("\ntrust tree:\n{}", l.tree);
            }
            Ok(())
        }
        TrustCommand::Why {
            config,
            agent,
            json,
        } => {
            let w: WhyAnswer = Admin::from_config(&config)?
                .get(&api::trust_why(&agent.to_string()))
                .await?;
            if json {
                out!("{}", serde_json::to_string(&w)?);
            } else if w.trusted {
                out!("trusted through {} grant(s):", w.chain.len());
                for hop in &w.chain {
                    out!("  {hop}");
                }
            } else {
                out!(
                    "not trusted: {}",
                    w.reason.clone().unwrap_or_else(|| "no chain".into())
                );
            }
            if !w.trusted {
                bail!("no trust chain to {agent}");
            }
            Ok(())
        }
    }
}
