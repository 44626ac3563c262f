//! Read-only Azure Blob URLs for offline seeding, signed by Caravan itself.
//!
//! OpenDAL 0.59's azblob presign is unfit to hand to strangers: with an
//! account key it signs a service SAS granting read, add, create, write
//! and delete (`sp=racwd`) valid one hour whatever expiry is asked for;
//! with a configured `sas_token` it appends that token, which may cover
//! the whole container or account. So Caravan signs a blob-scoped service
//! SAS with read permission only (`sr=b`, `sp=r`) and the asked-for
//! expiry, from the account key (reqsign's tested string-to-sign).

use std::time::Duration;

use reqsign_azure_storage::{ServiceSasResource, ServiceSharedAccessSignature};
use reqsign_core::time::Timestamp;

use crate::config::StorageConfig;
use crate::error::{Error, Result};

/// What [`AzblobSigner::from_config`] needs: said when offline seeding is
/// asked for on azblob storage without it.
pub const AZBLOB_NEEDS_KEY: &str = "offline seeding on azblob needs the storage account key \
     (`account_name` and `account_key` in the storage credentials): Caravan signs a read-only \
     SAS per staged chunk with it. A `sas_token` cannot be used: it would be handed to every \
     recipient, and it usually grants the whole container";

/// Signs read-only SAS URLs for blobs under one container and root.
#[derive(Clone)]
pub struct AzblobSigner {
    account: String,
    key: String,
    /// `https://<account>.blob.core.windows.net` or the configured endpoint
    /// (path-style for emulators: `http://127.0.0.1:10000/<account>`).
    endpoint: String,
    container: String,
    /// Normalised root without its leading slash, ends in `/` (or empty).
    root: String,
}

impl std::fmt::Debug for AzblobSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("AzblobSigner")
            .field("account", &self.account)
            .field("endpoint", &self.endpoint)
            .field("container", &self.container)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl AzblobSigner {
    /// The signer for azblob storage configured with an account key; `None`
    /// for any other scheme or without a key (offline seeding then says
    /// [`AZBLOB_NEEDS_KEY`]).
    pub fn from_config(cfg: &StorageConfig) -> Result<Option<Self>> {
        if cfg.scheme != "azblob" {
            return Ok(None);
        }
        let options = super::merged_options(cfg)?;
        let get = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| options.get(*n).filter(|v| !v.trim().is_empty()))
                .map(|v| v.trim().to_string())
        };
        let (Some(account), Some(key), Some(container)) = (
            get(&["account_name", "azure_storage_account_name"]),
            get(&["account_key", "azure_storage_account_key"]),
            get(&["container"]),
        ) else {
            return Ok(None);
        };
        let endpoint = get(&["endpoint"])
            .unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"))
            .trim_end_matches('/')
            .to_string();
        let root = get(&["root"]).unwrap_or_default();
        let root: Vec<&str> = root.split('/').filter(|s| !s.is_empty()).collect();
        let root = if root.is_empty() {
            String::new()
        } else {
            format!("{}/", root.join("/"))
        };
        Ok(Some(Self {
            account,
            key,
            endpoint,
            container,
            root,
        }))
    }

    /// A GET URL for `path` (relative to the storage root) valid for
    /// `validity`, read permission only, on that one blob.
    pub fn presign_read(&self, path: &str, validity: Duration) -> Result<String> {
        let blob = format!("{}{}", self.root, path.trim_start_matches('/'));
        let expiry = Timestamp::now() + validity;
        let sas = ServiceSharedAccessSignature::new(
            self.account.clone(),
            self.key.clone(),
            ServiceSasResource::Blob {
                container: self.container.clone(),
                blob: blob.clone(),
            },
            "r".into(),
            expiry,
        );
        let pairs = sas
            .token()
            .map_err(|e| Error::Config(format!("signing an azblob SAS (account key): {e}")))?;
        let query: String = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k, false), encode(v, false)))
            .collect::<Vec<_>>()
            .join("&");
        Ok(format!(
            "{}/{}/{}?{query}",
            self.endpoint,
            encode(&self.container, true),
            encode(&blob, true)
        ))
    }
}

/// Percent-encodes all but unreserved characters (and `/` in paths).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(options: &[(&str, &str)]) -> StorageConfig {
        StorageConfig {
            scheme: "azblob".into(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            credentials: None,
            size_limit: None,
        }
    }

    #[test]
    fn a_url_is_read_only_blob_scoped_and_under_the_root() {
        let s = AzblobSigner::from_config(&cfg(&[
            ("container", "c"),
            ("endpoint", "http://127.0.0.1:1/acct/"),
            ("root", "/a b/x/"),
            ("account_name", "acct"),
            ("account_key", "a2V5"),
        ]))
        .unwrap()
        .unwrap();
        let url = s
            .presign_read(".caravan/seed/chunks/00ff", Duration::from_secs(60))
            .unwrap();
        assert!(
            url.starts_with("http://127.0.0.1:1/acct/c/a%20b/x/.caravan/seed/chunks/00ff?"),
            "{url}"
        );
        assert!(url.contains("sp=r&") && url.contains("sr=b") && url.contains("sig="));
        assert!(!format!("{s:?}").contains("a2V5"));
    }

    #[test]
    fn without_a_key_there_is_no_signer() {
        let c = cfg(&[("container", "c"), ("sas_token", "sv=x&sig=y")]);
        assert!(AzblobSigner::from_config(&c).unwrap().is_none());
    }
}
