//! Share ids and tickets: the part of sharing that travels between people
//! (and that the operator checks), light enough to build without the data
//! plane. `manifest` re-exports both.
//!
//! A ticket is what a recipient needs to fetch: the share id, the publisher,
//! the share key wrapped for that recipient (or no key, for a share published
//! to the publisher's trusted agents), and where to look.

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use serde::{Deserialize, Serialize};

use crate::config::{MAX_ADDRESS_LEN, MAX_ADDRESSES, MAX_REPOSITORIES};
use crate::crypto::{Key, random_bytes};
use crate::error::{Error, Result};
use crate::identity::{AgentId, SecretKey, wrap_key};
use crate::record::{Kind, Record, SignedRecord};

/// Prefix of a ticket's text form.
pub const TICKET_PREFIX: &str = "caravan-ticket-v1:";

/// Names a share across all its versions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShareId(pub [u8; 32]);

crate::text_serde!(ShareId);

impl ShareId {
    /// A fresh random share id.
    pub fn random() -> Result<Self> {
        Ok(ShareId(random_bytes()?))
    }

    /// A filesystem- and URL-safe form used in state paths.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for ShareId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sh1-{}",
            BASE32_NOPAD.encode(&self.0).to_ascii_lowercase()
        )
    }
}

impl fmt::Debug for ShareId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShareId({self})")
    }
}

impl FromStr for ShareId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(b) = s.strip_prefix("sh1-") {
            let raw = BASE32_NOPAD
                .decode(b.to_ascii_uppercase().as_bytes())
                .map_err(|e| Error::parse("share id", e))?;
            let arr: [u8; 32] = raw
                .try_into()
                .map_err(|_| Error::parse("share id", "expected 32 bytes"))?;
            return Ok(ShareId(arr));
        }
        if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            let mut arr = [0u8; 32];
            for (i, out) in arr.iter_mut().enumerate() {
                *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                    .map_err(|e| Error::parse("share id", e))?;
            }
            return Ok(ShareId(arr));
        }
        Err(Error::parse(
            "share id",
            "expected `sh1-…` or 64 hex digits",
        ))
    }
}

/// What a recipient is handed to fetch a share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The share.
    pub share_id: ShareId,
    /// The agent that signs the manifests.
    pub publisher: AgentId,
    /// The agent this ticket is for (the key is wrapped for it alone).
    pub recipient: AgentId,
    /// The share key, wrapped for `recipient`.
    pub wrapped_key: Vec<u8>,
    /// Peer addresses (host:port) known to hold the share.
    pub addresses: Vec<String>,
    /// Repository URLs where holders announce themselves.
    pub repositories: Vec<String>,
}

impl Record for Ticket {
    const KIND: Kind = Kind::Ticket;
}

impl Ticket {
    /// Makes and signs a ticket for one recipient.
    pub fn issue(
        publisher: &SecretKey,
        share_id: ShareId,
        recipient: AgentId,
        share_key: &Key,
        addresses: Vec<String>,
        repositories: Vec<String>,
    ) -> Result<String> {
        let t = Ticket {
            share_id,
            publisher: publisher.agent_id(),
            recipient,
            wrapped_key: wrap_key(&recipient, share_key)?,
            addresses,
            repositories,
        };
        let rec = SignedRecord::seal(publisher, &t)?;
        Ok(format!(
            "{TICKET_PREFIX}{}",
            BASE64URL_NOPAD.encode(&rec.to_bytes())
        ))
    }

    /// Makes and signs a ticket without a key, for a share published to
    /// "agents I trust within depth N": the recipient learns where and what
    /// to fetch, and gets the key only from the publisher after its trust
    /// chain is checked.
    pub fn issue_keyless(
        publisher: &SecretKey,
        share_id: ShareId,
        recipient: AgentId,
        addresses: Vec<String>,
        repositories: Vec<String>,
    ) -> Result<String> {
        let t = Ticket {
            share_id,
            publisher: publisher.agent_id(),
            recipient,
            wrapped_key: Vec::new(),
            addresses,
            repositories,
        };
        let rec = SignedRecord::seal(publisher, &t)?;
        Ok(format!(
            "{TICKET_PREFIX}{}",
            BASE64URL_NOPAD.encode(&rec.to_bytes())
        ))
    }

    /// Refuses a ticket listing more places to look than an agent gives
    /// out ([`MAX_ADDRESSES`], [`MAX_REPOSITORIES`], [`MAX_ADDRESS_LEN`]):
    /// each is contacted, so a hostile publisher's ticket of a thousand
    /// silent addresses would hold the fetch for hours before it failed.
    fn check_bounds(&self) -> Result<()> {
        let too_long = |v: &[String]| v.iter().any(|a| a.is_empty() || a.len() > MAX_ADDRESS_LEN);
        if self.addresses.len() > MAX_ADDRESSES || too_long(&self.addresses) {
            return Err(Error::Record(format!(
                "ticket lists {} peer addresses (at most {MAX_ADDRESSES}, each 1 to \
                 {MAX_ADDRESS_LEN} bytes): not one an agent makes",
                self.addresses.len()
            )));
        }
        if self.repositories.len() > MAX_REPOSITORIES || too_long(&self.repositories) {
            return Err(Error::Record(format!(
                "ticket lists {} repositories (at most {MAX_REPOSITORIES}, each 1 to \
                 {MAX_ADDRESS_LEN} bytes): not one an agent makes",
                self.repositories.len()
            )));
        }
        Ok(())
    }

    /// Parses and verifies a ticket's text form.
    pub fn parse(text: &str) -> Result<Ticket> {
        let body = text
            .trim()
            .strip_prefix(TICKET_PREFIX)
            .ok_or_else(|| Error::parse("ticket", format!("must start with `{TICKET_PREFIX}`")))?;
        // Damaged text (a character changed, the end cut off when copied)
        // is said as such, with the detail after.
        let damaged = |e: &dyn std::fmt::Display| {
            Error::parse(
                "ticket",
                format!(
                    "damaged or cut short ({e}): copy it whole, from `{TICKET_PREFIX}` to its \
                     last character"
                ),
            )
        };
        let bytes = BASE64URL_NOPAD
            .decode(body.as_bytes())
            .map_err(|e| damaged(&e))?;
        let rec = SignedRecord::from_bytes(&bytes).map_err(|e| damaged(&e))?;
        let t: Ticket = rec.open().map_err(|e| damaged(&e))?;
        if rec.signer != t.publisher {
            return Err(Error::Record(
                "ticket is not signed by its publisher".into(),
            ));
        }
        t.check_bounds()?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guarantee: a ticket listing more places to look than an agent
    /// gives out is refused when parsed, before anything is dialled (a
    /// hostile publisher's ticket of silent addresses would otherwise hold
    /// the fetch for their connect limits, 8 at a time).
    #[test]
    fn a_ticket_with_too_many_places_to_look_is_refused() {
        let publisher = SecretKey::generate().unwrap();
        let recipient = SecretKey::generate().unwrap().agent_id();
        let key = Key(random_bytes().unwrap());
        let share = ShareId::random().unwrap();
        let make = |addresses: Vec<String>, repositories: Vec<String>| {
            Ticket::issue(&publisher, share, recipient, &key, addresses, repositories).unwrap()
        };
        let addrs = |n: usize| {
            (0..n)
                .map(|i| format!("10.0.0.{i}:7400"))
                .collect::<Vec<_>>()
        };
        let repos = |n: usize| {
            (0..n)
                .map(|i| format!("http://r{i}:7500"))
                .collect::<Vec<_>>()
        };
        let t = Ticket::parse(&make(addrs(MAX_ADDRESSES), repos(MAX_REPOSITORIES))).unwrap();
        assert_eq!(t.addresses.len(), MAX_ADDRESSES);
        let e = Ticket::parse(&make(addrs(MAX_ADDRESSES + 1), vec![])).unwrap_err();
        assert!(e.to_string().contains("17 peer addresses"), "{e}");
        let e = Ticket::parse(&make(vec![], repos(MAX_REPOSITORIES + 1))).unwrap_err();
        assert!(e.to_string().contains("17 repositories"), "{e}");
        let long = format!("{}:7400", "h".repeat(MAX_ADDRESS_LEN));
        assert!(Ticket::parse(&make(vec![long], vec![])).is_err());
    }
}
