//! The few filesystem calls a fetched file needs on a local disk, made with
//! `std::fs` and folded into as few blocking-pool hops as possible instead
//! of going through OpenDAL.
//!
//! Why: a tree of small files pays these calls once per file. Through
//! OpenDAL's fs service a `stat` is a blocking-pool hop plus an extended
//! attribute listing, a missing file comes back as an error value that
//! captures a backtrace when `RUST_BACKTRACE` is set (2.4% of a 1,000-file
//! fetch here), and a rename is three hops (stat, create the parent,
//! rename). Per file that was eight hops. Here the destination and the part
//! files are listed once per fetch ([`Listing`]), a new part file is created
//! by its first write (`direct.rs`), and the last write, the sync and the
//! rename run together ([`place`] after `Closing::complete`): a small file
//! is one hop.
//!
//! Paths are the fetch's own (destination prefix + a manifest path checked
//! by `manifest::check_path`, or the state prefix's part files) and are
//! joined under the configured root with the same confinement OpenDAL
//! applies: no parent, root or prefix components.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

pub(crate) use super::beneath::confined;

/// The size of a regular file, `None` if nothing is there (or something
/// that is not a file: a fetched file never replaces a directory silently,
/// the write fails later with the path in its error). A symbolic link is
/// not followed, as in [`Listing`]: the fetched file replaces the link.
fn file_size(path: &Path) -> io::Result<Option<u64>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(Some(m.len())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// Sizes of the destination file and of its part file, in one hop.
pub(crate) async fn sizes(
    root: &Path,
    dest: &str,
    part: &str,
) -> io::Result<(Option<u64>, Option<u64>)> {
    let (dest, part) = (confined(root, dest)?, confined(root, part)?);
    tokio::task::spawn_blocking(move || Ok((file_size(&dest)?, file_size(&part)?)))
        .await
        .map_err(io::Error::other)?
}

/// The regular files under `prefix` (a storage path ending in `/`) with
/// their sizes, keyed by storage path; `Ok(None)` past `max` entries.
/// Nothing there is an empty listing. Symbolic links are not followed nor
/// listed: a fetched file replaces one rather than writing through it.
fn list_files(root: &Path, prefix: &str, max: usize) -> io::Result<Option<HashMap<String, u64>>> {
    let mut out = HashMap::new();
    let mut dirs = vec![(
        confined(root, prefix)?,
        prefix.trim_end_matches('/').to_string(),
    )];
    let mut seen = 0usize;
    while let Some((dir, key)) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        };
        for entry in entries {
            seen += 1;
            if seen > max {
                return Ok(None);
            }
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let path = if key.is_empty() {
                name
            } else {
                format!("{key}/{name}")
            };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push((entry.path(), path));
            } else if kind.is_file() {
                out.insert(path, entry.metadata()?.len());
            }
        }
    }
    Ok(Some(out))
}

/// What a fetch's destination and part files already hold, listed once at
/// its start (one blocking call, instead of two stats per file).
pub(crate) struct Listing {
    dest: HashMap<String, u64>,
    parts: HashMap<String, u64>,
}

impl Listing {
    /// Lists `dest` and `partial` (both storage prefixes); `None` when
    /// either holds more than `max` entries (then each file is asked about
    /// alone, [`sizes`]).
    pub(crate) async fn read(
        root: &Path,
        dest: &str,
        partial: &str,
        max: usize,
    ) -> io::Result<Option<Listing>> {
        let (root, dest, partial) = (root.to_path_buf(), dest.to_string(), partial.to_string());
        tokio::task::spawn_blocking(move || {
            let Some(dest) = list_files(&root, &dest, max)? else {
                return Ok(None);
            };
            let Some(parts) = list_files(&root, &partial, max)? else {
                return Ok(None);
            };
            Ok(Some(Listing { dest, parts }))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Sizes of a destination file and of its part file, as listed.
    pub(crate) fn sizes(&self, dest: &str, part: &str) -> (Option<u64>, Option<u64>) {
        (self.dest.get(dest).copied(), self.parts.get(part).copied())
    }
}

/// Notes that the fetch is about to move a file to `dest` (appended to
/// `log`, made with its folder when missing). Before the move: a crash
/// between the two notes a file not placed, which is harmless (a file the
/// user has at that path was refused before the fetch began, or is the
/// share's own).
pub(crate) fn note_placed(log: &Path, dest: &str) -> io::Result<()> {
    note_placed_all(log, &[dest])
}

/// [`note_placed`] for several paths at once (folders end in `/`).
pub(crate) fn note_placed_all(log: &Path, paths: &[&str]) -> io::Result<()> {
    use std::io::Write;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let lines: String = paths.iter().map(|p| format!("{p}\n")).collect();
    f.write_all(lines.as_bytes())
}

/// Moves a complete (and synced) part file to its destination, creating
/// the destination's directories when missing. Blocking: called on the
/// blocking pool right after the file's last write and sync, in the same
/// hop. Its directory entry is synced later with the others
/// (`Job::sync_written`).
pub(crate) fn place(root: &Path, part: &str, dest: &str, replace: bool) -> io::Result<PathBuf> {
    let (from, to) = (confined(root, part)?, confined(root, dest)?);
    super::beneath::rename_into(root, &from, dest, replace)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", to.display())))?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_could_leave_the_root_are_refused() {
        let root = Path::new("/srv/data");
        assert_eq!(
            confined(root, "dst/a/b.bin").unwrap(),
            PathBuf::from("/srv/data/dst/a/b.bin")
        );
        for bad in ["../x", "dst/../../x", "/etc/passwd"] {
            let e = confined(root, bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_part_file_is_placed_under_new_directories_and_sized() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join(".caravan/partial")).unwrap();
        std::fs::write(root.join(".caravan/partial/7"), b"hello").unwrap();
        assert_eq!(
            sizes(root, "dst/x/y.txt", ".caravan/partial/7")
                .await
                .unwrap(),
            (None, Some(5))
        );
        let placed = place(root, ".caravan/partial/7", "dst/x/y.txt", false).unwrap();
        assert_eq!(placed, root.join("dst/x/y.txt"));
        assert_eq!(std::fs::read(&placed).unwrap(), b"hello");
        assert_eq!(
            sizes(root, "dst/x/y.txt", ".caravan/partial/7")
                .await
                .unwrap(),
            (Some(5), None)
        );
        // One listing tells the same, for every file at once.
        std::fs::create_dir_all(root.join("dst/x/z")).unwrap();
        std::fs::write(root.join("dst/x/z/w"), b"abc").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("dst/link")).unwrap();
        let l = Listing::read(root, "dst/", ".caravan/partial/", 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            l.sizes("dst/x/y.txt", ".caravan/partial/7"),
            (Some(5), None)
        );
        assert_eq!(
            l.sizes("dst/x/z/w", ".caravan/partial/nope"),
            (Some(3), None)
        );
        assert_eq!(l.sizes("dst/link", "x").0, None, "links are not followed");
        assert_eq!(sizes(root, "dst/link", "x").await.unwrap().0, None);
        assert!(
            Listing::read(root, "dst/", ".caravan/partial/", 2)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            Listing::read(root, "nothing/", ".caravan/none/", 2)
                .await
                .unwrap()
                .is_some()
        );
        // A directory where the file would go is not a file of any size,
        // and placing onto it fails with the path named.
        std::fs::create_dir_all(root.join("dst/d")).unwrap();
        std::fs::write(root.join(".caravan/partial/8"), b"x").unwrap();
        assert_eq!(
            sizes(root, "dst/d", ".caravan/partial/8").await.unwrap().0,
            None
        );
        let e = place(root, ".caravan/partial/8", "dst/d", true).unwrap_err();
        assert!(e.to_string().contains("dst/d"), "{e}");
        // A file that appeared where there was none is never replaced;
        // the share's own (`replace`) is.
        std::fs::write(root.join("dst/mine"), b"my notes").unwrap();
        let e = place(root, ".caravan/partial/8", "dst/mine", false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().contains("dst/mine"), "{e}");
        assert_eq!(std::fs::read(root.join("dst/mine")).unwrap(), b"my notes");
        place(root, ".caravan/partial/8", "dst/mine", true).unwrap();
        assert_eq!(std::fs::read(root.join("dst/mine")).unwrap(), b"x");
    }
}
