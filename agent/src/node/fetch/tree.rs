//! What a new version changes in the shape of the folder tree a recipient
//! holds from the previous one, on a local disk: a file that became a
//! folder (`x`, then `x/y`), a folder that became a file (the reverse), and
//! folders the new version dropped.
//!
//! Why: a fetch creates the new version's folders and moves each finished
//! file into place. A file where a folder must go makes creating the folder
//! fail; a folder where a file must go makes the move fail; both halfway
//! through the fetch, every time it is resumed. So before anything is
//! written the old entry is removed: a file the previous version had, or a
//! folder once the previous version's files under it are gone and it holds
//! nothing else (a folder holding files that are not the share's is never
//! emptied: the fetch is refused, naming it). After the fetch, folders the
//! new version dropped are removed when empty, as its dropped files are.
//!
//! Every step looks at what is really on disk (`symlink_metadata`, links
//! never followed), so a resumed fetch that already did part of it does
//! the rest. On object stores keys `x` and `x/y` coexist on most, not on
//! those that keep objects as files (s3s-fs, MinIO, WebDAV): there the
//! previous version's objects in the way are deleted before the fetch
//! writes (`Agent::make_room_in_objects`, from the same [`Reshape`]).

use std::collections::HashSet;
use std::io;
use std::path::Path;

use crate::error::{Context, Error, Result};
use crate::node::fetch::beneath;
use crate::node::fetch::local::confined;

/// The changes of shape between two versions, as paths under the
/// destination.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Reshape {
    /// Files of the previous version where the new one has a folder.
    pub files_to_folders: Vec<String>,
    /// Folders of the previous version where the new one has a file, each
    /// with the previous version's files under it.
    pub folders_to_files: Vec<(String, Vec<String>)>,
    /// Folders of the previous version the new one does not have, deepest
    /// first (removed after the fetch, when empty).
    pub dropped_folders: Vec<String>,
}

/// The paths of `sorted` under the folder `p` (`p/…`): one range, found
/// by binary search, so no path's parents are ever listed (a 4 KiB path
/// of one-letter folders has two thousand of them).
fn under<'a, 's>(sorted: &'s [&'a str], p: &str) -> impl Iterator<Item = &'a str> + 's {
    let prefix = format!("{p}/");
    let start = sorted.partition_point(|s| *s < prefix.as_str());
    sorted[start..]
        .iter()
        .copied()
        .take_while(move |s| s.starts_with(&prefix))
}

impl Reshape {
    /// Compares the previous version (its files and folders) with the new
    /// one. A path is a folder of a version if the version lists it as
    /// one or has a file under it. Every lookup is a hash or a binary
    /// search: what a hostile publisher's manifests can make this cost is
    /// bounded by their size (n log n), never their shape.
    pub(crate) fn between<'o, 'n>(
        old_files: &[&'o str],
        old_dirs: impl Iterator<Item = &'o str>,
        new_files: &[&'n str],
        new_dirs: impl Iterator<Item = &'n str>,
    ) -> Reshape {
        let mut old_sorted = old_files.to_vec();
        old_sorted.sort_unstable();
        let mut new_sorted = new_files.to_vec();
        new_sorted.sort_unstable();
        let old_dirs: HashSet<&str> = old_dirs.collect();
        let new_dirs: HashSet<&str> = new_dirs.collect();
        let new_set: HashSet<&str> = new_files.iter().copied().collect();
        let is_new_folder =
            |p: &str| new_dirs.contains(p) || under(&new_sorted, p).next().is_some();
        let is_old_folder =
            |p: &str| old_dirs.contains(p) || under(&old_sorted, p).next().is_some();
        let files_to_folders = old_sorted
            .iter()
            .filter(|o| is_new_folder(o))
            .map(|o| o.to_string())
            .collect();
        let folders_to_files = new_sorted
            .iter()
            .filter(|f| is_old_folder(f))
            .map(|f| {
                (
                    f.to_string(),
                    under(&old_sorted, f).map(String::from).collect(),
                )
            })
            .collect();
        // Every folder of the previous version: those it listed, and those
        // that held its files without being listed (a publisher on an
        // object store lists keys, not folders); each parent walked up to
        // once (linear in the paths).
        let mut old_folders: HashSet<&str> = HashSet::new();
        for p in old_dirs.iter().copied().chain(old_sorted.iter().copied()) {
            let mut end = if old_dirs.contains(p) {
                Some(p.len())
            } else {
                p.rfind('/')
            };
            while let Some(e) = end {
                if !old_folders.insert(&p[..e]) {
                    break;
                }
                end = p[..e].rfind('/');
            }
        }
        let mut dropped: Vec<&str> = old_folders
            .into_iter()
            .filter(|d| !is_new_folder(d) && !new_set.contains(d))
            .collect();
        // Deepest first: a folder is empty only once those below are gone.
        dropped.sort_by_cached_key(|d| (std::cmp::Reverse(d.matches('/').count()), *d));
        Reshape {
            files_to_folders,
            folders_to_files,
            dropped_folders: dropped.into_iter().map(String::from).collect(),
        }
    }

    /// Whether anything must change before the new version is written.
    pub(crate) fn before_is_empty(&self) -> bool {
        self.files_to_folders.is_empty() && self.folders_to_files.is_empty()
    }

    /// Before the fetch writes: removes the files where folders go, and the
    /// folders where files go (the previous version's files in them first;
    /// refused if anything else is left in one). Blocking.
    pub(crate) fn make_room(&self, root: &Path, dest: &str, seq: u64) -> Result<()> {
        let at = |p: &str| confined(root, &format!("{dest}{p}")).context(|| format!("{dest}{p}"));
        // Every folder to replace is looked at before anything is removed:
        // one holding a file that is not the previous version's refuses
        // the fetch with the previous version's files all still there
        // (they were removed first, and the user's edits to them with it).
        for (f, held) in &self.folders_to_files {
            let path = at(f)?;
            if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let held: HashSet<&str> = held.iter().map(String::as_str).collect();
            if let Some(stranger) = first_stranger(&path, f, &held)? {
                return Err(Error::Rejected(format!(
                    "version {seq} makes {dest}{f} a file, and the folder there holds \
                     {dest}{stranger}, which is not the share's: move it away and fetch again \
                     (nothing was written)"
                )));
            }
        }
        // Removals go through `beneath`: never through a link swapped in
        // since the folders were checked.
        let remove = |rel: String| {
            beneath::remove_files(root, std::iter::once(rel.as_str())).context(|| rel.clone())
        };
        for p in &self.files_to_folders {
            let path = at(p)?;
            match std::fs::symlink_metadata(&path) {
                Ok(m) if !m.is_dir() => remove(format!("{dest}{p}"))?,
                _ => {}
            }
        }
        for (f, held) in &self.folders_to_files {
            let path = at(f)?;
            if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            for h in held {
                let file = at(h)?;
                if std::fs::symlink_metadata(&file).is_ok_and(|m| !m.is_dir()) {
                    remove(format!("{dest}{h}"))?;
                }
            }
            if !remove_empty_folders(root, &path, &format!("{dest}{f}"))? {
                return Err(Error::Rejected(format!(
                    "version {seq} makes {dest}{f} a file, and the folder there holds files that \
                     are not the share's: move them away and fetch again (nothing was written)"
                )));
            }
        }
        Ok(())
    }

    /// After the fetch: removes the folders the new version dropped, those
    /// left empty (a folder holding anything else stays). Blocking; never
    /// fails the fetch.
    pub(crate) fn drop_folders(&self, root: &Path, dest: &str) {
        let rels: Vec<String> = self
            .dropped_folders
            .iter()
            .map(|d| format!("{dest}{d}"))
            .collect();
        // Never through a link swapped in during the fetch (`beneath`).
        let _ = beneath::remove_empty_dirs(root, rels.iter().map(String::as_str));
    }
}

/// Refuses (before a fetch starts) a destination `dest` (a storage path
/// ending in `/`) whose folders, from the storage's root down, include a
/// symbolic link or a file; `true` when it exists (so what is under it
/// is worth looking at).
pub(crate) fn check_dest(root: &Path, dest: &str) -> Result<bool> {
    let mut walked = String::new();
    for part in dest.split('/').filter(|p| !p.is_empty()) {
        walked.push_str(part);
        match kind(root, &walked)? {
            None => return Ok(false),
            Some(m) if m.file_type().is_symlink() => return refuse(&walked, "a symbolic link"),
            Some(m) if !m.is_dir() => return refuse(&walked, "a file, not a folder"),
            Some(_) => {}
        }
        walked.push('/');
    }
    Ok(true)
}

/// What is at storage path `p`, links not followed; `None` if nothing (or
/// a file where a folder on the way should be).
fn kind(root: &Path, p: &str) -> Result<Option<std::fs::Metadata>> {
    let at = confined(root, p).context(|| p.to_string())?;
    match std::fs::symlink_metadata(&at) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => Ok(None),
        Err(e) => Err(e).context(|| p.to_string()),
    }
}

fn refuse<T>(p: &str, what: &str) -> Result<T> {
    Err(Error::Rejected(format!(
        "{p} is {what}: a fetch writes only in folders of the storage, never through a link \
         or over a file that is not the share's; move it away or fetch elsewhere (nothing was \
         written)"
    )))
}

/// Before a fetch writes on a local disk: refuses (nothing written) when a
/// write or a removal would pass through a symbolic link or meet a file
/// where a folder must be. `dest` (a storage path ending in `/`) and every
/// folder under it that the new version's entries (`files`, `dirs`) or the
/// previous version's files there (`old_files`) lie in are looked at with
/// `symlink_metadata`, links never followed.
///
/// Why: the storage is a folder the recipient's own user may change. A
/// link where the destination or one of the share's folders goes would
/// make the fetch write (and a later version remove) files wherever it
/// leads, outside the storage or into the agent's state. A file of the
/// recipient's where the share has a folder would fail the fetch halfway
/// (a file of the previous version is removed by [`Reshape::make_room`]).
///
/// Cost: one `lstat` per folder whose parent exists (none under a missing
/// folder), each folder once however many paths lie in it.
pub(crate) fn check_folders<'a>(
    root: &Path,
    dest: &str,
    files: impl Iterator<Item = &'a str>,
    dirs: impl Iterator<Item = &'a str>,
    old_files: &HashSet<&'a str>,
) -> Result<()> {
    if !check_dest(root, dest)? {
        return Ok(());
    }
    // Folders under it: `true` where the new version needs a folder.
    let mut folders: std::collections::BTreeMap<&str, bool> = Default::default();
    let mut add = |p: &'a str, itself: bool, needed: bool| {
        let mut end = if itself { Some(p.len()) } else { p.rfind('/') };
        while let Some(e) = end {
            let f = &p[..e];
            match folders.get_mut(f) {
                // In already, and so are its parents (each folder is
                // marked needed at most once: linear in the paths).
                Some(n) if *n || !needed => break,
                Some(n) => *n = true,
                None => {
                    folders.insert(f, needed);
                }
            }
            end = f.rfind('/');
        }
    };
    for d in dirs {
        add(d, true, true);
    }
    for f in files {
        add(f, false, true);
    }
    for f in old_files {
        add(f, false, false);
    }
    // Sorted, a folder comes before everything under it.
    let mut missing: HashSet<&str> = HashSet::new();
    for (f, needed) in folders {
        if f.rfind('/').is_some_and(|e| missing.contains(&f[..e])) {
            missing.insert(f);
            continue;
        }
        let p = format!("{dest}{f}");
        match kind(root, &p)? {
            None => {
                missing.insert(f);
            }
            Some(m) if m.file_type().is_symlink() => return refuse(&p, "a symbolic link"),
            Some(m) if m.is_dir() => {}
            Some(_) if needed && !old_files.contains(f) => {
                return refuse(&p, "a file that is not the share's, where it has a folder");
            }
            Some(_) => {
                missing.insert(f);
            }
        }
    }
    Ok(())
}

/// The first entry under folder `path` (storage path `rel` under the
/// destination) that is neither a folder nor one of the `held` files
/// (paths under the destination), links not followed.
fn first_stranger(path: &Path, rel: &str, held: &HashSet<&str>) -> Result<Option<String>> {
    let shown = || path.display().to_string();
    for entry in std::fs::read_dir(path).context(shown)? {
        let entry = entry.context(shown)?;
        let name = entry.file_name();
        let here = format!("{rel}/{}", name.to_string_lossy());
        if entry.file_type().context(shown)?.is_dir() {
            if let Some(s) = first_stranger(&entry.path(), &here, held)? {
                return Ok(Some(s));
            }
        } else if name.to_str().is_none() || !held.contains(here.as_str()) {
            return Ok(Some(here));
        }
    }
    Ok(None)
}

/// Removes the folder at `path` (storage path `rel`) and the folders in
/// it that hold no files, through `beneath`; `false` if any holds
/// something that is not a folder (a file, a link: links are never
/// followed), which stays with the folders above it.
fn remove_empty_folders(root: &Path, path: &Path, rel: &str) -> Result<bool> {
    let mut folders = Vec::new();
    folders_below(path, rel, &mut folders)?;
    let removed = beneath::remove_empty_dirs(root, folders.iter().map(String::as_str))
        .context(|| rel.to_string())?;
    Ok(removed.last().is_some_and(|r| r == rel))
}

/// The folders under `path` (storage path `rel`) and itself, deepest
/// first; links are not entered.
fn folders_below(path: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
    let shown = || path.display().to_string();
    for entry in std::fs::read_dir(path).context(shown)? {
        let entry = entry.context(shown)?;
        if entry.file_type().context(shown)?.is_dir() {
            let name = entry.file_name();
            let here = format!("{rel}/{}", name.to_string_lossy());
            folders_below(&entry.path(), &here, out)?;
        }
    }
    out.push(rel.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn between(old: (&[&str], &[&str]), new: (&[&str], &[&str])) -> Reshape {
        Reshape::between(old.0, old.1.iter().copied(), new.0, new.1.iter().copied())
    }

    #[test]
    fn kind_changes_and_dropped_folders_are_found() {
        let r = between(
            (&["x", "d/a", "d/e/b", "keep/k"], &["empty", "d", "d/e"]),
            (&["x/y", "d", "keep/k"], &["new"]),
        );
        assert_eq!(r.files_to_folders, ["x"]);
        assert_eq!(
            r.folders_to_files,
            [(
                "d".to_string(),
                vec!["d/a".to_string(), "d/e/b".to_string()]
            )]
        );
        // `d` is a file now (not dropped as a folder); `d/e` goes first.
        assert_eq!(r.dropped_folders, ["d/e", "empty"]);
        assert!(between((&["a/b"], &[]), (&["a/b", "c"], &[])).before_is_empty());
        // Folders the previous version held files in without listing them
        // (an object store's keys) are dropped too, deepest first.
        let r = between((&["i/a/b/f", "i/g", "k/h"], &[]), (&["i/g", "k/h2"], &[]));
        assert_eq!(r.dropped_folders, ["i/a/b", "i/a"]);
    }

    #[test]
    fn room_is_made_and_a_folder_holding_foreign_files_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("dst/d/e")).unwrap();
        std::fs::write(root.join("dst/x"), b"old file").unwrap();
        std::fs::write(root.join("dst/d/a"), b"old").unwrap();
        std::fs::write(root.join("dst/d/e/b"), b"old").unwrap();
        let r = between((&["x", "d/a", "d/e/b"], &[]), (&["x/y", "d"], &[]));
        r.make_room(root, "dst/", 2).unwrap();
        assert!(!root.join("dst/x").exists() && !root.join("dst/d").exists());
        // Done already: nothing to do, no error (a resumed fetch).
        std::fs::create_dir_all(root.join("dst/x")).unwrap();
        std::fs::write(root.join("dst/d"), b"new file").unwrap();
        r.make_room(root, "dst/", 2).unwrap();
        assert!(root.join("dst/x").is_dir() && root.join("dst/d").is_file());

        std::fs::remove_file(root.join("dst/d")).unwrap();
        std::fs::create_dir_all(root.join("dst/d/e")).unwrap();
        std::fs::write(root.join("dst/d/e/b"), b"old").unwrap();
        std::fs::write(root.join("dst/d/mine.txt"), b"the user's").unwrap();
        let e = r.make_room(root, "dst/", 2).unwrap_err();
        assert!(e.to_string().contains("dst/d/mine.txt"), "{e}");
        assert_eq!(
            std::fs::read(root.join("dst/d/mine.txt")).unwrap(),
            b"the user's"
        );
        // Refused before anything went: the previous version's file (and
        // any edit of it) is still there.
        assert_eq!(std::fs::read(root.join("dst/d/e/b")).unwrap(), b"old");

        std::fs::create_dir_all(root.join("dst/gone/deeper")).unwrap();
        std::fs::create_dir_all(root.join("dst/kept")).unwrap();
        std::fs::write(root.join("dst/kept/mine"), b"x").unwrap();
        let r = between((&[], &["gone", "gone/deeper", "kept"]), (&[], &[]));
        r.drop_folders(root, "dst/");
        assert!(!root.join("dst/gone").exists() && root.join("dst/kept/mine").exists());
    }

    /// A publisher's manifests shaped to make the comparison expensive:
    /// a thousand files each 2,000 folders deep, every one of them turned
    /// into a folder, and back. Listing every parent of every path would
    /// hash gigabytes here; one sort and binary searches do not.
    #[test]
    fn deep_paths_cost_their_size_not_their_depth() {
        let deep = "a/".repeat(1_999);
        let files: Vec<String> = (0..1_000).map(|i| format!("{deep}f{i}")).collect();
        let nested: Vec<String> = files.iter().map(|f| format!("{f}/x")).collect();
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        let nested: Vec<&str> = nested.iter().map(String::as_str).collect();
        let r = Reshape::between(&files, std::iter::empty(), &nested, std::iter::empty());
        assert_eq!(r.files_to_folders.len(), 1_000);
        let back = Reshape::between(&nested, std::iter::empty(), &files, std::iter::empty());
        assert_eq!(back.folders_to_files.len(), 1_000);
        assert!(
            back.folders_to_files
                .iter()
                .all(|(_, held)| held.len() == 1)
        );
    }

    /// Guarantee: a fetch never writes or removes through a link the
    /// recipient's storage holds, nor over a file of its own where the
    /// share has a folder; refused before anything is written.
    #[test]
    fn folders_on_the_way_are_never_links_or_strangers_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("storage");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("d/sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("outlink")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d/linked")).unwrap();
        std::fs::write(root.join("afile"), b"mine").unwrap();
        std::fs::write(root.join("d/mine"), b"mine").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d/filelink")).unwrap();
        let none = HashSet::new();
        let check = |dest: &str, files: &[&str], dirs: &[&str], old: &HashSet<&str>| {
            check_folders(
                &root,
                dest,
                files.iter().copied(),
                dirs.iter().copied(),
                old,
            )
        };
        let refused = |r: Result<()>, says: &str| {
            let e = r.unwrap_err();
            assert!(e.is_bad_input() && e.to_string().contains(says), "{e}");
        };
        // The destination itself, or a folder on its way.
        refused(
            check("outlink/", &["a"], &[], &none),
            "outlink is a symbolic link",
        );
        refused(check("outlink/x/", &["a"], &[], &none), "a symbolic link");
        refused(check("afile/", &["a"], &[], &none), "afile is a file");
        // A folder of the share, or of the previous version's files.
        refused(
            check("d/", &["linked/x"], &[], &none),
            "d/linked is a symbolic link",
        );
        refused(
            check("d/", &["a"], &["linked"], &none),
            "d/linked is a symbolic link",
        );
        let old: HashSet<&str> = ["linked/old"].into();
        refused(
            check("d/", &["a"], &[], &old),
            "d/linked is a symbolic link",
        );
        // A file of the recipient's where the share has a folder.
        refused(check("d/", &["mine/x"], &[], &none), "not the share's");
        // ... but the previous version's file there is replaced.
        let old: HashSet<&str> = ["mine"].into();
        check("d/", &["mine/x"], &[], &old).unwrap();
        // A link where a file goes is replaced, not followed; missing
        // folders (and everything under them) are fine.
        check(
            "d/",
            &["filelink", "sub/a", "new/deep/er/b"],
            &["sub", "new"],
            &none,
        )
        .unwrap();
        check("fresh/", &["a/b/c"], &["a"], &none).unwrap();
        check("", &["d/sub/a"], &["d", "d/sub"], &none).unwrap();
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    }
}
