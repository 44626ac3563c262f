//! What a publish carries: the walk of a path in the agent's storage into
//! the files and folders of a share, and what it leaves out, and why.
//!
//! A share carries regular files (with their permission bits) and folders,
//! named by UTF-8 paths every recipient can write safely
//! ([`check_path`]). Everything else a folder may hold is left out and
//! reported (in the daemon's log and the publish summary), never turned
//! into something else: a FIFO or a socket is not an empty file, a name
//! that is not UTF-8 is not the same name with replacement characters.
//!
//! Local folders are walked with `std::fs` (one `read_dir` per folder, the
//! entry's own type without following links): OpenDAL's lister follows
//! every link to stat it, retries a looping link as a temporary error
//! (seconds of back-off per loop) and shows a non-UTF-8 name lossily.
//! Symbolic links are published as a copy of their target only when that
//! is a regular file inside the published folder (inside the storage, for
//! a link published by its own path); a link to a folder is left out (a
//! link to an ancestor would be an endless tree).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::manifest::check_path;
use crate::node::agent::Agent;
use crate::node::state::as_folder;

/// How many left-out entries a publish summary names (all are counted,
/// and each is logged).
const SKIPPED_SHOWN: usize = 32;

/// The files and folders a publish carries.
#[derive(Debug, Default)]
pub struct Listing {
    /// The folder the share's paths are relative to (`""` or ending `/`).
    pub root: String,
    /// Files: (path under `root`, size, permission bits), sorted by path.
    pub files: Vec<(String, u64, u32)>,
    /// Folders: (path under `root`, permission bits), sorted by path.
    pub dirs: Vec<(String, u32)>,
    /// What was left out.
    pub skipped: Skipped,
    /// The ETag each file of an object store was listed with, where the
    /// store gives one and honours `If-Match` on reads: its publish reads
    /// that object only (`store::Sequential::pinned`).
    pub etags: HashMap<String, String>,
}

/// Why an entry was left out of a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Its name is not valid UTF-8 (shares carry UTF-8 paths).
    NotUtf8,
    /// Its path cannot be written safely everywhere (a backslash, an empty,
    /// `.` or `..` component, a name over 255 bytes or beginning or ending
    /// with whitespace, too long).
    UnsafeName,
    /// Neither a regular file nor a folder (a FIFO, socket or device).
    NotRegular,
    /// A symbolic link leading outside the published folder.
    LinkOutside,
    /// A symbolic link leading nowhere, or around in a loop.
    LinkBroken,
    /// A symbolic link to a folder (not followed).
    LinkToFolder,
    /// A key under a key that is also a file (`a` and `a/b`, or `a` and the
    /// folder marker `a/`): object stores allow both, a folder tree cannot
    /// hold them, so the file is kept and what is under it left out.
    UnderAFile,
    /// A file or folder the agent may not read (its permission bits or
    /// owner: an agent runs as an ordinary user). Left out and named
    /// instead of failing the whole publish halfway through its pass.
    Unreadable,
    /// Gone between the folder's listing and its `stat` (a temporary file
    /// of a program at work): left out, as `rsync` does, instead of failing
    /// the publish of a live folder.
    Vanished,
}

impl SkipReason {
    /// The reason in words, for logs and the CLI.
    pub fn says(self) -> &'static str {
        match self {
            SkipReason::NotUtf8 => "its name is not valid UTF-8",
            SkipReason::UnsafeName => {
                "its path cannot be written safely (backslash, control character, empty, `.` or `..` component, a name over 255 bytes or beginning or ending with whitespace, too long, or a `.caravan` folder at the share's top, where a recipient keeps its agent's state)"
            }
            SkipReason::NotRegular => "not a regular file or folder (a FIFO, socket or device)",
            SkipReason::LinkOutside => {
                "a symbolic link leading outside the published folder (or into the agent's state)"
            }
            SkipReason::LinkBroken => "a symbolic link leading nowhere (dangling or looping)",
            SkipReason::LinkToFolder => {
                "a symbolic link to a folder (links to folders are not followed)"
            }
            SkipReason::UnderAFile => "inside a path that is also a file (`a` and `a/b`)",
            SkipReason::Unreadable => "the agent may not read it (permission denied)",
            SkipReason::Vanished => "it was removed while the folder was being listed",
        }
    }
}

/// One entry left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedEntry {
    /// Its path under the published folder (lossy when not UTF-8).
    pub path: String,
    /// Why.
    pub reason: SkipReason,
}

/// What a publish left out: all counted, the first few named.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Entries left out.
    pub total: u64,
    /// The first of them (at most 32), in walk order.
    pub first: Vec<SkippedEntry>,
}

impl Skipped {
    fn add(&mut self, path: String, reason: SkipReason) {
        // Debug: a name may hold a newline or an escape sequence, which
        // would forge or garble a text log line.
        tracing::warn!(path = ?path, reason = reason.says(), "not published");
        self.total += 1;
        if self.first.len() < SKIPPED_SHOWN {
            self.first.push(SkippedEntry { path, reason });
        }
    }
}

impl Agent {
    /// Walks `path` (a folder or one file of the agent's storage; `""` =
    /// all of it, the agent's state folder excepted).
    pub(crate) async fn walk(&self, path: &str) -> Result<Listing> {
        let state = self.opts.state_prefix.clone();
        if let Some(fs_root) = &self.opts.fs_root {
            let (fs_root, path) = (fs_root.clone(), path.to_string());
            return tokio::task::spawn_blocking(move || walk_local(&fs_root, &path, &state))
                .await
                .map_err(|e| Error::Protocol(format!("walking task: {e}")))?;
        }
        self.walk_remote(path, &state).await
    }

    /// The walk of an object store: keys under a prefix.
    async fn walk_remote(&self, path: &str, state: &str) -> Result<Listing> {
        // Object stores have no folders, only keys under a prefix: a path
        // with keys under it is a folder, asked first with one LIST. A HEAD
        // of such a prefix is not only a wasted request: some servers answer
        // it with 500 (s3s-fs), which the retry layer retries for seconds
        // before the publish fails.
        let mut is_dir = path.is_empty()
            || path.ends_with('/')
            || crate::store::first_entry(&self.op, &format!("{path}/"))
                .await
                .context(|| format!("listing {path}/"))?
                .is_some();
        // A key that is a file and a prefix too (`a` and `a/b`): the file
        // is what a walk of its folder keeps (what is under it is left
        // out, `UnderAFile`), so publishing it by name publishes the file,
        // not the keys under it. Asked with a LIST of the key as a prefix
        // (its first entry is the key itself when it is an object), not a
        // HEAD (see above); a service that cannot list so keeps the folder.
        if is_dir && !path.is_empty() && !path.ends_with('/') {
            // Keys sort with the key itself first: one entry is enough.
            let first = crate::store::first_entry(&self.op, path)
                .await
                .ok()
                .flatten();
            if first.is_some_and(|e| e.path() == path && e.metadata().is_file()) {
                is_dir = false;
            }
        }
        let pinnable = self.op.info().capability().read_with_if_match;
        if !is_dir {
            let meta = match self.op.stat(path).await {
                Ok(meta) => meta,
                Err(e) if e.kind() == opendal::ErrorKind::NotFound => {
                    return Err(Error::NotFound(format!(
                        "nothing to publish at {path:?} in the agent's storage (paths are taken from the storage's root)"
                    )));
                }
                Err(e) => return Err(e).context(|| format!("publishing {path:?}")),
            };
            let (root, name) = split_file(path);
            let etags = match (pinnable, meta.etag()) {
                (true, Some(etag)) => HashMap::from([(name.clone(), etag.to_string())]),
                _ => HashMap::new(),
            };
            return Ok(Listing {
                root,
                files: vec![(name, meta.content_length(), 0o644)],
                etags,
                ..Listing::default()
            });
        }
        let root = as_folder(path);
        let mut lister = self
            .op
            .lister_with(&root)
            .recursive(true)
            .await
            .context(|| format!("listing {root:?}"))?;
        let mut out = Listing {
            root: root.clone(),
            ..Listing::default()
        };
        while let Some(entry) = lister
            .try_next()
            .await
            .context(|| format!("listing {root:?}"))?
        {
            let full = entry.path().to_string();
            if full == root || full.starts_with(state) {
                continue;
            }
            let Some(rel) = full.strip_prefix(&root) else {
                continue;
            };
            let rel = rel.trim_end_matches('/').to_string();
            if rel.is_empty() {
                continue;
            }
            if check_path(&rel).is_err() {
                out.skipped.add(rel, SkipReason::UnsafeName);
                continue;
            }
            if entry.metadata().is_dir() {
                out.dirs.push((rel, 0o755));
            } else {
                let listed = entry.metadata();
                let (size, etag) = match listed.content_length() {
                    0 => {
                        let meta = self
                            .op
                            .stat(&full)
                            .await
                            .context(|| format!("stat {full}"))?;
                        (meta.content_length(), meta.etag().map(str::to_string))
                    }
                    n => (n, listed.etag().map(str::to_string)),
                };
                if let (true, Some(etag)) = (pinnable, etag) {
                    out.etags.insert(rel.clone(), etag);
                }
                out.files.push((rel, size, 0o644));
            }
        }
        out.files.sort();
        out.dirs.sort();
        // What no folder tree can hold, left out as the manifest check
        // (`manifest::check_tree`) would refuse it whole.
        let files: HashSet<String> = out.files.iter().map(|f| f.0.clone()).collect();
        let under_a_file = |p: &str| p.match_indices('/').any(|(i, _)| files.contains(&p[..i]));
        let skipped = &mut out.skipped;
        out.files.retain(|(p, _, _)| {
            let keep = !under_a_file(p);
            if !keep {
                skipped.add(p.clone(), SkipReason::UnderAFile);
            }
            keep
        });
        out.dirs.retain(|(p, _)| {
            let keep = !files.contains(p) && !under_a_file(p);
            if !keep {
                skipped.add(format!("{p}/"), SkipReason::UnderAFile);
            }
            keep
        });
        Ok(out)
    }
}

/// `dir/name` -> (`dir/`, `name`).
fn split_file(path: &str) -> (String, String) {
    match path.rsplit_once('/') {
        Some((dir, name)) => (format!("{dir}/"), name.to_string()),
        None => (String::new(), path.to_string()),
    }
}

#[cfg(unix)]
fn mode_bits(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn mode_bits(meta: &std::fs::Metadata) -> u32 {
    if meta.is_dir() { 0o755 } else { 0o644 }
}

/// Whether an i/o error says the entry is no longer there.
fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

/// Whether the agent may read a file (or list and enter a folder) at
/// `path`: said by the bits alone when it owns it (or is root), else by
/// asking the kernel (groups, ACLs), so the common case costs no syscall.
#[cfg(unix)]
fn readable(path: &Path, meta: &std::fs::Metadata) -> bool {
    use rustix::fs::Access;
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid();
    let (need, ask) = if meta.is_dir() {
        (0o500, Access::READ_OK | Access::EXEC_OK)
    } else {
        (0o400, Access::READ_OK)
    };
    me.is_root()
        || (meta.uid() == me.as_raw() && meta.mode() & need == need)
        || rustix::fs::access(path, ask).is_ok()
}

#[cfg(not(unix))]
fn readable(_: &Path, _: &std::fs::Metadata) -> bool {
    true
}

/// The longest path the kernel takes, its closing NUL included (Linux's
/// `PATH_MAX`): an entry whose path on the disk is this long or longer
/// cannot be opened by its path.
pub(crate) const PATH_MAX: usize = 4096;

/// The walk of a local folder (or file) `path` under `fs_root`.
fn walk_local(fs_root: &Path, path: &str, state: &str) -> Result<Listing> {
    let target = fs_root.join(path.trim_end_matches('/'));
    let own = std::fs::symlink_metadata(&target);
    let own = match own {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!(
                "nothing to publish at {path:?} in the agent's storage (paths are taken from the storage's root)"
            )));
        }
        // A folder on the way the agent may not enter: refused (exit 3)
        // like the path itself unreadable, not an i/o error (exit 1).
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Error::Rejected(format!(
                "{path:?}: {} (its permission bits, its owner, or a folder on the way)",
                SkipReason::Unreadable.says()
            )));
        }
        Err(e) => return Err(e).context(|| format!("publishing {path:?}")),
    };
    // The published path may be a link, or pass through one: followed only
    // when where it really is stays inside the storage.
    let storage = std::fs::canonicalize(fs_root).context(|| "resolving the storage".into())?;
    let real = std::fs::canonicalize(&target).map_err(|_| {
        Error::Rejected(format!(
            "{path:?} is a symbolic link leading nowhere (dangling or looping)"
        ))
    })?;
    if !real.starts_with(&storage) {
        return Err(Error::Rejected(format!(
            "{path:?} is (or passes through) a symbolic link leading outside the agent's storage"
        )));
    }
    // The agent's state (wrapped share keys, tickets, part files) is never
    // published, whatever path or link leads there.
    let state_real = storage.join(state.trim_end_matches('/'));
    if real.starts_with(&state_real) {
        return Err(Error::Rejected(format!(
            "{path:?} leads into the agent's state folder {state:?}, which is never published"
        )));
    }
    let meta = if own.file_type().is_symlink() {
        std::fs::metadata(&target).context(|| format!("publishing {path:?}"))?
    } else {
        own
    };
    // The published path itself unreadable: refused (exit 3) as an entry
    // inside a folder is left out for it, not an i/o error (exit 1) later.
    if (meta.is_dir() || meta.is_file()) && !readable(&target, &meta) {
        return Err(Error::Rejected(format!(
            "{path:?}: {} (its permission bits, its owner, or a folder on the way)",
            SkipReason::Unreadable.says()
        )));
    }
    if meta.is_file() && !path.is_empty() {
        let (root, name) = split_file(path.trim_end_matches('/'));
        return Ok(Listing {
            root,
            files: vec![(name, meta.len(), mode_bits(&meta))],
            ..Listing::default()
        });
    }
    if !meta.is_dir() {
        return Err(Error::Rejected(format!(
            "{path:?} is neither a regular file nor a folder (a FIFO, socket or device)"
        )));
    }
    let root = as_folder(path);
    let inside = std::fs::canonicalize(&target).context(|| format!("resolving {path:?}"))?;
    let mut out = Listing {
        root: root.clone(),
        ..Listing::default()
    };
    // Folders still to read: (where, path under the published folder).
    let mut todo: Vec<(PathBuf, String)> = vec![(target, String::new())];
    while let Some((dir, prefix)) = todo.pop() {
        let shown = format!("{root}{prefix}");
        let entries = match std::fs::read_dir(&dir) {
            // A sub-folder removed since its parent was read.
            Err(e) if gone(&e) && !prefix.is_empty() => {
                let rel = prefix.trim_end_matches('/');
                out.dirs.retain(|(p, _)| p != rel);
                out.skipped.add(rel.to_string(), SkipReason::Vanished);
                continue;
            }
            r => r.context(|| format!("reading the folder {shown:?}"))?,
        };
        for entry in entries {
            let entry = entry.context(|| format!("reading the folder {shown:?}"))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                let lossy = name.to_string_lossy();
                out.skipped
                    .add(format!("{prefix}{lossy}"), SkipReason::NotUtf8);
                continue;
            };
            let rel = format!("{prefix}{name}");
            let full = format!("{root}{rel}");
            // The state folder by its name, or where it really is (the
            // published folder may be a link to the storage's root).
            if full.starts_with(state)
                || format!("{full}/") == state
                || inside.join(&rel) == state_real
            {
                continue;
            }
            if check_path(&rel).is_err() {
                out.skipped.add(rel, SkipReason::UnsafeName);
                continue;
            }
            let at = entry.path();
            // Deeper than this disk's paths reach: its own path could be
            // neither read nor listed (the kernel refuses it), and failing
            // the publish on it would leave the user no way to publish the
            // rest.
            if at.as_os_str().len() >= PATH_MAX {
                out.skipped.add(rel, SkipReason::UnsafeName);
                continue;
            }
            let kind = entry
                .file_type()
                .context(|| format!("reading the type of {full:?}"))?;
            let meta = if kind.is_symlink() {
                let Ok(real) = std::fs::canonicalize(&at) else {
                    out.skipped.add(rel, SkipReason::LinkBroken);
                    continue;
                };
                if !real.starts_with(&inside) || real.starts_with(&state_real) {
                    out.skipped.add(rel, SkipReason::LinkOutside);
                    continue;
                }
                let meta = match std::fs::metadata(&at) {
                    Err(e) if gone(&e) => {
                        out.skipped.add(rel, SkipReason::Vanished);
                        continue;
                    }
                    r => r.context(|| format!("stat {full:?}"))?,
                };
                if meta.is_dir() {
                    out.skipped.add(rel, SkipReason::LinkToFolder);
                    continue;
                }
                meta
            } else {
                match entry.metadata() {
                    Err(e) if gone(&e) => {
                        out.skipped.add(rel, SkipReason::Vanished);
                        continue;
                    }
                    r => r.context(|| format!("stat {full:?}"))?,
                }
            };
            if (meta.is_dir() || meta.is_file()) && !readable(&at, &meta) {
                out.skipped.add(rel, SkipReason::Unreadable);
                continue;
            }
            if meta.is_dir() {
                out.dirs.push((rel.clone(), mode_bits(&meta)));
                todo.push((at, format!("{rel}/")));
            } else if meta.is_file() {
                out.files.push((rel, meta.len(), mode_bits(&meta)));
            } else {
                out.skipped.add(rel, SkipReason::NotRegular);
            }
        }
    }
    out.files.sort();
    out.dirs.sort();
    Ok(out)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A name a publish leaves out is logged escaped: a newline in it
    /// cannot start a forged log line.
    #[test]
    fn a_skipped_name_cannot_forge_a_log_line() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(sub, || {
            Skipped::default().add(
                "x\n2026-01-01T00:00:00Z  INFO forged".into(),
                SkipReason::UnsafeName,
            );
        });
        let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(logged.lines().count(), 1, "{logged}");
        assert!(logged.contains("x\\n2026"), "{logged}");
    }
    use std::os::unix::ffi::OsStrExt;

    fn reasons(l: &Listing) -> Vec<(String, SkipReason)> {
        let mut v: Vec<_> = l
            .skipped
            .first
            .iter()
            .map(|s| (s.path.clone(), s.reason))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn a_folder_carries_files_and_folders_and_names_what_it_leaves_out() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let t = root.join("t");
        std::fs::create_dir_all(t.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(t.join("empty")).unwrap();
        std::fs::write(t.join("a.txt"), b"a").unwrap();
        std::fs::write(t.join("sub/deeper/b"), b"bb").unwrap();
        std::fs::write(t.join("back\\slash"), b"x").unwrap();
        std::fs::write(t.join("trailing "), b"x").unwrap();
        std::fs::write(t.join(std::ffi::OsStr::from_bytes(b"\xff-latin1")), b"x").unwrap();
        std::fs::write(root.join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink("a.txt", t.join("link-in")).unwrap();
        std::os::unix::fs::symlink("../outside", t.join("link-out")).unwrap();
        std::os::unix::fs::symlink("nowhere", t.join("dangling")).unwrap();
        std::os::unix::fs::symlink("loop2", t.join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", t.join("loop2")).unwrap();
        std::os::unix::fs::symlink(".", t.join("self")).unwrap();
        mkfifo(&t.join("fifo"));
        let _sock = std::os::unix::net::UnixListener::bind(t.join("sock")).unwrap();
        std::fs::create_dir_all(root.join(".caravan")).unwrap();

        let l = walk_local(root, "t", ".caravan/").unwrap();
        assert_eq!(l.root, "t/");
        let files: Vec<_> = l.files.iter().map(|f| (f.0.as_str(), f.1)).collect();
        assert_eq!(files, [("a.txt", 1), ("link-in", 1), ("sub/deeper/b", 2)]);
        let dirs: Vec<_> = l.dirs.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(dirs, ["empty", "sub", "sub/deeper"]);
        assert_eq!(
            reasons(&l),
            [
                ("back\\slash".to_string(), SkipReason::UnsafeName),
                ("dangling".into(), SkipReason::LinkBroken),
                ("fifo".into(), SkipReason::NotRegular),
                ("link-out".into(), SkipReason::LinkOutside),
                ("loop1".into(), SkipReason::LinkBroken),
                ("loop2".into(), SkipReason::LinkBroken),
                ("self".into(), SkipReason::LinkToFolder),
                ("sock".into(), SkipReason::NotRegular),
                ("trailing ".into(), SkipReason::UnsafeName),
                ("\u{fffd}-latin1".into(), SkipReason::NotUtf8),
            ]
        );
        assert_eq!(l.skipped.total, 10);

        // The whole storage: the state folder is not part of it.
        let all = walk_local(root, "", ".caravan/").unwrap();
        assert!(all.dirs.iter().all(|d| !d.0.starts_with(".caravan")));
        assert!(all.files.iter().any(|f| f.0 == "outside"));
    }

    #[test]
    fn a_published_path_that_is_not_a_file_or_folder_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("storage");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(tmp.path().join("secret"), b"s").unwrap();
        std::fs::write(root.join("f"), b"ff").unwrap();
        mkfifo(&root.join("fifo"));
        std::os::unix::fs::symlink("../secret", root.join("out")).unwrap();
        std::os::unix::fs::symlink("f", root.join("in")).unwrap();
        std::os::unix::fs::symlink("in-loop", root.join("in-loop")).unwrap();
        std::fs::create_dir_all(tmp.path().join("elsewhere")).unwrap();
        std::fs::write(tmp.path().join("elsewhere/passwd"), b"p").unwrap();
        std::os::unix::fs::symlink("../elsewhere", root.join("dirlink")).unwrap();

        let one = walk_local(&root, "in", ".caravan/").unwrap();
        assert_eq!(one.files, [("in".to_string(), 2, one.files[0].2)]);
        for (path, says) in [
            ("fifo", "neither a regular file nor a folder"),
            ("out", "outside the agent's storage"),
            ("dirlink", "outside the agent's storage"),
            ("dirlink/passwd", "outside the agent's storage"),
            ("in-loop", "leading nowhere"),
        ] {
            let e = walk_local(&root, path, ".caravan/").unwrap_err();
            assert!(e.is_bad_input(), "{path}: {e}");
            assert!(e.to_string().contains(says), "{path}: {e}");
        }
        let e = walk_local(&root, "missing", ".caravan/").unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
    }

    /// The agent's state (wrapped share keys, tickets) is never published,
    /// whatever link leads there: a link to it or into it refused, a link
    /// to a file in it left out, a link to the storage's root walked
    /// without it.
    #[test]
    fn no_link_leads_a_publish_into_the_state_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("storage");
        std::fs::create_dir_all(root.join(".caravan/shares")).unwrap();
        std::fs::write(root.join(".caravan/shares/share.json"), b"wrapped key").unwrap();
        std::fs::create_dir_all(root.join("t")).unwrap();
        std::fs::write(root.join("t/a"), b"a").unwrap();
        std::os::unix::fs::symlink(".caravan", root.join("statelink")).unwrap();
        std::os::unix::fs::symlink(".", root.join("all")).unwrap();
        std::os::unix::fs::symlink("../.caravan/shares/share.json", root.join("t/key")).unwrap();
        for path in [
            "statelink",
            "statelink/shares",
            "statelink/shares/share.json",
        ] {
            let e = walk_local(&root, path, ".caravan/").unwrap_err();
            assert!(e.is_bad_input(), "{path}: {e}");
            assert!(e.to_string().contains("state folder"), "{path}: {e}");
        }
        let whole = walk_local(&root, "", ".caravan/").unwrap();
        assert_eq!(
            reasons(&whole)[..1],
            [("all".to_string(), SkipReason::LinkToFolder)]
        );
        assert!(whole.files.iter().all(|f| !f.0.contains("share.json")));
        let t = walk_local(&root, "t", ".caravan/").unwrap();
        assert_eq!(reasons(&t), [("key".to_string(), SkipReason::LinkOutside)]);
        let through = walk_local(&root, "all", ".caravan/").unwrap();
        assert!(
            through.files.iter().all(|f| !f.0.contains(".caravan")),
            "{:?}",
            through.files
        );
        assert!(
            through.dirs.iter().all(|d| !d.0.contains(".caravan")),
            "{:?}",
            through.dirs
        );
        assert!(through.files.iter().any(|f| f.0 == "t/a"));
    }

    #[test]
    fn a_summary_names_the_first_few_and_counts_all() {
        let mut s = Skipped::default();
        for i in 0..100 {
            s.add(format!("f{i}"), SkipReason::NotRegular);
        }
        assert_eq!(s.total, 100);
        assert_eq!(s.first.len(), SKIPPED_SHOWN);
    }

    fn mkfifo(p: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Object stores hold `a` and `a/b` side by side; a folder tree cannot.
    /// The walk keeps the file and names what it leaves out, so the
    /// manifest it builds passes `manifest::check_tree`.
    #[tokio::test]
    async fn keys_under_a_file_key_are_left_out_of_an_object_store_walk() {
        let op = crate::store::open(&crate::config::StorageConfig {
            scheme: "memory".into(),
            options: Default::default(),
            credentials: None,
            size_limit: None,
        })
        .unwrap();
        for k in ["t/a", "t/a/b", "t/a/c/d", "t/e/f", "t/e", "t/g/h"] {
            op.write(k, b"x".to_vec()).await.unwrap();
        }
        let agent = Agent::for_test(op, None).await;
        let l = agent.walk("t").await.unwrap();
        let files: Vec<_> = l.files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(files, ["a", "e", "g/h"]);
        let mut left: Vec<_> = reasons(&l);
        left.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            left,
            [
                ("a/b".to_string(), SkipReason::UnderAFile),
                ("a/c/d".to_string(), SkipReason::UnderAFile),
                ("e/f".to_string(), SkipReason::UnderAFile),
            ]
        );
        let paths = l
            .files
            .iter()
            .map(|f| (f.0.as_str(), true))
            .chain(l.dirs.iter().map(|d| (d.0.as_str(), false)));
        crate::manifest::check_tree("walk", paths).unwrap();
    }

    /// An object store's key may hold a segment no disk can name (over 255
    /// bytes): left out and named, not a share every recipient on a disk
    /// fails on halfway.
    /// A tree deeper than the disk's paths reach (made with paths relative
    /// to each folder, as a program that changes directory can) is
    /// published down to where its paths still open: the first entry too
    /// deep is left out as an unsafe name, not a failed publish.
    #[test]
    fn folders_deeper_than_the_disks_paths_are_left_out() {
        use rustix::fs::{Mode, OFlags};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir(root.join("deep")).unwrap();
        std::fs::write(root.join("deep/top"), b"t").unwrap();
        let mut dir = rustix::fs::open(
            root.join("deep"),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .unwrap();
        let name = "d".repeat(200);
        for _ in 0..(PATH_MAX / 201 + 2) {
            rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            dir = rustix::fs::openat(
                &dir,
                name.as_str(),
                OFlags::DIRECTORY | OFlags::RDONLY,
                Mode::empty(),
            )
            .unwrap();
        }
        let l = walk_local(root, "deep", ".caravan/").unwrap();
        assert_eq!(l.files.len(), 1, "{:?}", l.files);
        let skipped = reasons(&l);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].1, SkipReason::UnsafeName);
        let too_deep = root.join("deep").join(&skipped[0].0);
        assert!(too_deep.as_os_str().len() >= PATH_MAX);
        assert!(
            l.dirs
                .iter()
                .all(|d| root.join("deep").join(&d.0).as_os_str().len() < PATH_MAX)
        );
    }

    #[tokio::test]
    async fn names_longer_than_a_disk_holds_are_left_out_of_an_object_store_walk() {
        let op = crate::store::open(&crate::config::StorageConfig {
            scheme: "memory".into(),
            options: Default::default(),
            credentials: None,
            size_limit: None,
        })
        .unwrap();
        let long = "n".repeat(crate::manifest::MAX_NAME_BYTES + 1);
        let longest = "m".repeat(crate::manifest::MAX_NAME_BYTES);
        for k in [
            format!("t/{long}.txt"),
            format!("t/{long}/x"),
            format!("t/{longest}"),
            "t/ok".to_string(),
        ] {
            op.write(&k, b"x".to_vec()).await.unwrap();
        }
        let agent = Agent::for_test(op, None).await;
        let l = agent.walk("t").await.unwrap();
        let files: Vec<_> = l.files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(files, [longest.as_str(), "ok"]);
        let left = reasons(&l);
        assert!(
            !left.is_empty()
                && left
                    .iter()
                    .all(|(p, r)| p.starts_with(&long) && *r == SkipReason::UnsafeName),
            "{left:?}"
        );
    }
}
