//! The one owner of the folders under the agent's state prefix, and the
//! shared "list a state folder and decode each file" helper. Every other
//! file asks here for a path instead of spelling one:
//!
//! ```text
//! <prefix>shares/<share hex>/{manifest,share.json}  held shares
//! <prefix>fetches/<share hex>.json                   fetches to resume
//! <prefix>publishes/<share hex>.json                 publishes to resume
//! <prefix>partial/<share hex>/<seq>/                 files being fetched
//! <prefix>trust/records/<blake3>.rec                 grants, revocations
//! <prefix>trust/peers/<share hex>.json               peers learned last
//! <prefix>seed/chunks/<chunk hex>                     sealed chunks staged for offline seeding
//! <prefix>seed/index/<share hex>                      a share's seed index (presigned URLs)
//! <prefix>seed/shares/<share hex>.json                a share's seeding policy and last record
//! ```

use opendal::Operator;

use crate::error::{Context, Error, Result};
use crate::manifest::ShareId;
use crate::util::hex;

/// A path the user names in the agent's storage (what to publish, where to
/// fetch to), in OpenDAL form: no leading `/` (`/` and `""` are the root),
/// `.` and empty components dropped, a trailing `/` kept. Refused (bad
/// input, nothing touched) when it would leave the storage (a `..`
/// component: on a local disk that is the agent's own folder, its key
/// and admin token), holds a control character or a name no disk holds
/// (over 255 bytes), or lies inside the agent's state folder `prefix`.
pub fn user_path(prefix: &str, path: &str) -> Result<String> {
    let p = path.trim();
    let refuse = |why: &str| Err(Error::Rejected(format!("the path {p:?} {why}")));
    if p.len() > 4096 || p.chars().any(char::is_control) {
        return refuse("is too long or holds a control character");
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return refuse("leaves the agent's storage (`..`)"),
            c if c.len() > crate::manifest::MAX_NAME_BYTES => {
                return refuse("holds a name longer than 255 bytes");
            }
            c => parts.push(c),
        }
    }
    let mut norm = parts.join("/");
    let state = prefix.trim_end_matches('/');
    if !state.is_empty() && (norm == state || norm.starts_with(&format!("{state}/"))) {
        return refuse("is inside the agent's state folder");
    }
    if !norm.is_empty() && p.ends_with('/') {
        norm.push('/');
    }
    Ok(norm)
}

/// `p` as a folder prefix: `""` (the root) or ending with `/`.
pub fn as_folder(p: &str) -> String {
    if p.is_empty() || p.ends_with('/') {
        p.to_string()
    } else {
        format!("{p}/")
    }
}

/// A checked user path ([`user_path`]) naming a folder, as a folder prefix.
pub fn user_folder(prefix: &str, path: &str) -> Result<String> {
    Ok(as_folder(&user_path(prefix, path)?))
}

/// `<prefix>shares/`: one folder per held share.
pub fn shares_dir(prefix: &str) -> String {
    format!("{prefix}shares/")
}

/// `<prefix>shares/<id>/`: one held share.
pub fn share_dir(prefix: &str, id: &ShareId) -> String {
    format!("{prefix}shares/{}/", id.hex())
}

/// `<prefix>fetches/`: the requests of unfinished fetches.
pub fn fetches_dir(prefix: &str) -> String {
    format!("{prefix}fetches/")
}

/// `<prefix>fetches/<id>.json`: one unfinished fetch.
pub fn fetch_file(prefix: &str, id: &ShareId) -> String {
    format!("{prefix}fetches/{}.json", id.hex())
}

/// `<prefix>publishes/`: the records of publishes whose pass is running.
pub fn publishes_dir(prefix: &str) -> String {
    format!("{prefix}publishes/")
}

/// `<prefix>publishes/<id>.json`: one publish whose pass is running.
pub fn publish_file(prefix: &str, id: &ShareId) -> String {
    format!("{prefix}publishes/{}.json", id.hex())
}

/// `<prefix>partial/<id>/`: everything a fetch of `id` has half written.
pub fn partial_dir(prefix: &str, id: &ShareId) -> String {
    format!("{prefix}partial/{}/", id.hex())
}

/// `<prefix>partial/<id>/placed`: the files (storage paths, one a line) an
/// unfinished fetch of `id` moved into place on a local disk, whatever the
/// version: the share's, not the user's, when a later version comes to
/// replace or drop them (`Job::placed_log`). Goes with the partial folder.
pub fn placed_log(prefix: &str, id: &ShareId) -> String {
    format!("{prefix}partial/{}/placed", id.hex())
}

/// `<prefix>partial/<id>/<seq>/`: files of one manifest version being fetched.
pub fn partial_seq_dir(prefix: &str, id: &ShareId, seq: u64) -> String {
    format!("{prefix}partial/{}/{seq}/", id.hex())
}

/// `<prefix>trust/records/`: one signed grant or revocation per file.
pub fn trust_records_dir(prefix: &str) -> String {
    format!("{prefix}trust/records/")
}

/// `<prefix>trust/outbox/`: grants and revocations this agent signed that
/// some configured repository has not taken yet (one JSON file each).
pub fn trust_outbox_dir(prefix: &str) -> String {
    format!("{prefix}trust/outbox/")
}

/// `<prefix>trust/peers/<share hex>.json`: the peers of a share learned last.
pub fn trust_peers_file(prefix: &str, share: &[u8; 32]) -> String {
    format!("{prefix}trust/peers/{}.json", hex(share))
}

/// `<prefix>seed/chunks/`: sealed chunks staged in the bucket, by id only
/// (no file name, no plaintext size beyond the chunk's own length).
pub fn seed_chunks_dir(prefix: &str) -> String {
    format!("{prefix}seed/chunks/")
}

/// `<prefix>seed/chunks/<chunk hex>`: one staged sealed chunk.
pub fn seed_chunk(prefix: &str, id: &[u8; 32]) -> String {
    format!("{prefix}seed/chunks/{}", hex(id))
}

/// `<prefix>seed/index/<share hex>`: the seed index of one share.
pub fn seed_index(prefix: &str, id: &ShareId) -> String {
    format!("{prefix}seed/index/{}", id.hex())
}

/// `<prefix>seed/index/`: every seed index.
pub fn seed_index_dir(prefix: &str) -> String {
    format!("{prefix}seed/index/")
}

/// `<prefix>seed/shares/`: the seeding policy of each offline-seeded share.
pub fn seed_shares_dir(prefix: &str) -> String {
    format!("{prefix}seed/shares/")
}

/// `<prefix>seed/shares/<share hex>.json`: one share's seeding policy.
pub fn seed_share_file(prefix: &str, id: &ShareId) -> String {
    format!("{prefix}seed/shares/{}.json", id.hex())
}

/// Lists `dir`, reads every file whose name ends in `suffix` and decodes it.
/// A file that does not decode is reported (as `what`) and skipped, never
/// fatal: one bad file must not stop an agent. A storage failure is an
/// error. A folder never written is empty.
pub async fn read_each<T, E: std::fmt::Display>(
    op: &Operator,
    dir: &str,
    suffix: &str,
    what: &str,
    decode: impl Fn(&[u8]) -> std::result::Result<T, E>,
) -> Result<Vec<(String, T)>> {
    let entries = crate::store::list_or_empty(op, dir).await?;
    let mut out = Vec::new();
    for e in entries {
        if !e.path().ends_with(suffix) {
            continue;
        }
        let bytes = op
            .read(e.path())
            .await
            .context(|| format!("reading {}", e.path()))?;
        match decode(&bytes.to_vec()) {
            Ok(v) => out.push((e.path().to_string(), v)),
            Err(err) => tracing::warn!(path = e.path(), error = %err, "ignoring unreadable {what}"),
        }
    }
    Ok(out)
}

/// The sub-folders of `dir` (a folder never written has none).
pub async fn sub_dirs(op: &Operator, dir: &str) -> Result<Vec<String>> {
    Ok(crate::store::list_or_empty(op, dir)
        .await?
        .into_iter()
        .map(|e| e.path().to_string())
        .filter(|p| p != dir && p.ends_with('/'))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_paths_stay_in_the_storage_and_out_of_the_state() {
        let ok = |p: &str| user_path(".caravan/", p).unwrap();
        assert_eq!(ok(""), "");
        assert_eq!(ok("/"), "");
        assert_eq!(ok("."), "");
        assert_eq!(ok("./photos//2024/"), "photos/2024/");
        assert_eq!(ok("/photos/a.jpg"), "photos/a.jpg");
        assert_eq!(ok("x/.caravan"), "x/.caravan");
        assert_eq!(ok(".caravanx"), ".caravanx");
        assert_eq!(ok(&"n".repeat(255)), "n".repeat(255));
        assert_eq!(user_folder(".caravan/", "./in//box").unwrap(), "in/box/");
        assert_eq!(user_folder(".caravan/", "/").unwrap(), "");
        for bad in [
            "..",
            "../",
            "../etc",
            "t/../..",
            "t/../.caravan",
            "a/b/../../..",
            ".caravan",
            "./.caravan/shares",
            "/.caravan/",
            "a\nb",
            "a\0b",
            &format!("a/{}/b", "n".repeat(256)),
        ] {
            let e = user_path(".caravan/", bad).unwrap_err();
            assert!(e.is_bad_input(), "{bad:?}: {e}");
        }
    }
}
