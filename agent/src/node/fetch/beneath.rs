//! What a fetch changes in the destination on a local disk — a file moved
//! into place, a folder made, a file removed, a mode set — done through
//! the folder it lies in, opened from the storage's root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: no symbolic link on
//! the way is followed, whenever it appeared.
//!
//! Why: the destination is a folder others may write while a fetch runs
//! (the recipient, another program, a shared volume). The folders on the
//! way are checked before the fetch writes (`tree::check_folders`), but a
//! folder swapped for a link to `/elsewhere` after that check made the
//! fetch put its files there, and a new version that dropped files remove
//! what was there. Path-based calls cannot close that window; calls
//! relative to a folder opened without following links can. The last
//! component is never followed either: a rename or an unlink acts on a
//! link itself, and a mode is set through a file opened `O_NOFOLLOW`.
//!
//! Where `openat2` is missing (Linux before 5.6, a seccomp profile that
//! refuses it, another OS) the path-based calls are used as before.

use std::io;
use std::path::{Component, Path, PathBuf};

/// `root` joined with a storage path, refused if the path could leave it.
pub(crate) fn confined(root: &Path, path: &str) -> io::Result<PathBuf> {
    let trimmed = path.trim_end_matches('/');
    let escapes = Path::new(trimmed).components().any(|c| {
        matches!(
            c,
            Component::ParentDir | Component::RootDir | Component::Prefix(_)
        )
    });
    if escapes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path}: escapes the storage root"),
        ));
    }
    Ok(root.join(trimmed))
}

/// The folder part and the name of a storage path (`a/b/c` → `a/b`, `c`).
fn split(rel: &str) -> (&str, &str) {
    let rel = rel.trim_end_matches('/');
    match rel.rfind('/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => ("", rel),
    }
}

/// Whether a folder on the way is not there (missing, or a file now).
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// A link met on the way, said as such (the kernel says `ELOOP` or `EXDEV`).
fn link_on_the_way(rel: &str) -> io::Error {
    io::Error::other(format!(
        "{rel}: a symbolic link on the way (a fetch never writes or removes through one)"
    ))
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::path::Path;

    use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

    use super::{gone, link_on_the_way, split};

    const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS);

    /// The storage's root, opened once per call.
    pub(super) struct Root(OwnedFd);

    impl Root {
        /// `None` when `openat2` is not available here (then the caller
        /// falls back to path-based calls).
        pub(super) fn open(root: &Path) -> io::Result<Option<Root>> {
            // Whether `openat2` works here, learned once per process.
            static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            if WORKS.get() == Some(&false) {
                return Ok(None);
            }
            let fd = rustix::fs::open(
                root,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            if WORKS.get() == Some(&true) {
                return Ok(Some(Root(fd)));
            }
            // Probe once: the root itself, relative to itself.
            match rustix::fs::openat2(
                &fd,
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            ) {
                Ok(_) => {
                    let _ = WORKS.set(true);
                    Ok(Some(Root(fd)))
                }
                Err(e @ (rustix::io::Errno::NOSYS | rustix::io::Errno::PERM)) => {
                    if WORKS.set(false).is_ok() {
                        tracing::warn!(error = %e, "openat2 is not available (Linux before 5.6, or a seccomp profile refuses it): a fetch's writes are checked for links before, not at each call");
                    }
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            }
        }

        /// The folder `rel` ("" is the root), made (with its parents) when
        /// `create` and missing.
        fn folder(&self, rel: &str, create: bool) -> io::Result<OwnedFd> {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let open = |at: &OwnedFd, p: &str| {
                rustix::fs::openat2(at, p, flags, Mode::empty(), RESOLVE).map_err(|e| match e {
                    rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => link_on_the_way(rel),
                    e => io::Error::from(e),
                })
            };
            let rel = rel.trim_matches('/');
            let first = open(&self.0, if rel.is_empty() { "." } else { rel });
            match first {
                Err(e) if create && e.kind() == io::ErrorKind::NotFound => {}
                r => return r,
            }
            let mut at = open(&self.0, ".")?;
            for part in rel.split('/').filter(|p| !p.is_empty()) {
                match rustix::fs::mkdirat(&at, part, Mode::from_raw_mode(0o777)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                at = open(&at, part)?;
            }
            Ok(at)
        }

        /// Moves `from` (an absolute path: a part file of the agent's
        /// state) to `to` (a storage path), making its folders; over a
        /// file there only when `replace` (see [`super::rename_into`]).
        pub(super) fn rename_into(&self, from: &Path, to: &str, replace: bool) -> io::Result<()> {
            use rustix::fs::{RenameFlags, renameat, renameat_with, statat};
            use rustix::io::Errno;
            let (dir, name) = split(to);
            let at = self.folder(dir, true)?;
            let cwd = rustix::fs::CWD;
            if replace {
                return renameat(cwd, from, &at, name).map_err(Into::into);
            }
            match renameat_with(cwd, from, &at, name, RenameFlags::NOREPLACE) {
                Err(Errno::EXIST) => Err(super::appeared()),
                // A filesystem without RENAME_NOREPLACE: look, then move.
                Err(Errno::INVAL | Errno::NOSYS) => {
                    match statat(&at, name, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(_) => Err(super::appeared()),
                        Err(Errno::NOENT) => renameat(cwd, from, &at, name).map_err(Into::into),
                        Err(e) => Err(e.into()),
                    }
                }
                r => r.map_err(Into::into),
            }
        }

        /// Makes folder `rel` (and its parents).
        pub(super) fn make_folder(&self, rel: &str) -> io::Result<()> {
            self.folder(rel, true).map(drop)
        }

        /// Removes the file (or link) `rel`; gone already is fine.
        pub(super) fn remove_file(&self, rel: &str) -> io::Result<()> {
            let (dir, name) = split(rel);
            let at = match self.folder(dir, false) {
                Err(e) if gone(&e) => return Ok(()),
                r => r?,
            };
            match rustix::fs::unlinkat(&at, name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }

        /// Removes the folder `rel` if it is empty: `Ok(false)` when it
        /// holds something (or is not there).
        pub(super) fn remove_empty_dir(&self, rel: &str) -> io::Result<bool> {
            let (dir, name) = split(rel);
            let at = match self.folder(dir, false) {
                Err(e) if gone(&e) => return Ok(false),
                r => r?,
            };
            match rustix::fs::unlinkat(&at, name, AtFlags::REMOVEDIR) {
                Ok(()) => Ok(true),
                Err(
                    rustix::io::Errno::NOENT
                    | rustix::io::Errno::NOTEMPTY
                    | rustix::io::Errno::EXIST
                    | rustix::io::Errno::NOTDIR,
                ) => Ok(false),
                Err(e) => Err(e.into()),
            }
        }

        /// Sets the mode of the file or folder `rel`, never through a link.
        pub(super) fn set_mode(&self, rel: &str, mode: u32) -> io::Result<()> {
            let (dir, name) = split(rel);
            let at = self.folder(dir, false)?;
            let fd = rustix::fs::openat2(
                &at,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            )
            .map_err(|e| match e {
                rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => link_on_the_way(rel),
                e => io::Error::from(e),
            })?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(Into::into)
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;
    use std::path::Path;

    pub(super) struct Root;

    impl Root {
        pub(super) fn open(_: &Path) -> io::Result<Option<Root>> {
            Ok(None)
        }
        pub(super) fn rename_into(&self, _: &Path, _: &str, _: bool) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
        pub(super) fn make_folder(&self, _: &str) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
        pub(super) fn remove_file(&self, _: &str) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
        pub(super) fn set_mode(&self, _: &str, _: u32) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
        pub(super) fn remove_empty_dir(&self, _: &str) -> io::Result<bool> {
            Err(io::ErrorKind::Unsupported.into())
        }
    }
}

/// Moves the part file `from` (absolute) to storage path `to` under `root`,
/// making its folders; nothing on the way to `to` is followed. A file
/// already at `to` is replaced only when `replace` (the share's own: the
/// previous version's, or one an unfinished fetch of it placed); any other
/// appeared there while the fetch ran, the user's, and is left as it is
/// (`RENAME_NOREPLACE`): the move fails, naming it.
pub(crate) fn rename_into(root: &Path, from: &Path, to: &str, replace: bool) -> io::Result<()> {
    match imp::Root::open(root)? {
        Some(r) => r.rename_into(from, to, replace),
        None => {
            let to = confined(root, to)?;
            if !replace && std::fs::symlink_metadata(&to).is_ok() {
                return Err(appeared());
            }
            if let Err(e) = std::fs::rename(from, &to) {
                let parent = to.parent().filter(|_| e.kind() == io::ErrorKind::NotFound);
                let Some(parent) = parent else {
                    return Err(e);
                };
                std::fs::create_dir_all(parent)?;
                std::fs::rename(from, &to)?;
            }
            Ok(())
        }
    }
}

/// Makes the folder `rel` (and its parents) under `root`.
pub(crate) fn make_folder(root: &Path, rel: &str) -> io::Result<()> {
    match imp::Root::open(root)? {
        Some(r) => r.make_folder(rel),
        None => std::fs::create_dir_all(confined(root, rel)?),
    }
}

/// A file at a path a fetch was about to move a new file to, where there
/// was none when it began.
fn appeared() -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        "a file appeared there while the fetch ran (one of your own?): it is left as it is; \
         move it away and fetch again",
    )
}

/// Removes the files `rels` under `root` (missing ones are fine). Where
/// the user put a folder of their own in a file's place (or a file in
/// place of a folder on its path), that is not the share's to remove: it
/// stays, with a warning, rather than failing every retry of the fetch.
pub(crate) fn remove_files<'a>(root: &Path, rels: impl Iterator<Item = &'a str>) -> io::Result<()> {
    let r = imp::Root::open(root)?;
    for rel in rels {
        let done = match &r {
            Some(r) => r.remove_file(rel),
            None => match std::fs::remove_file(confined(root, rel)?) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
        };
        match done {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::IsADirectory | io::ErrorKind::NotADirectory
                ) =>
            {
                tracing::warn!(path = ?rel, error = %e,
                    "a file the new version dropped is no longer a file here (something of the user's own took its place): left as it is");
            }
            done => done.map_err(|e| io::Error::new(e.kind(), format!("removing {rel}: {e}")))?,
        }
    }
    Ok(())
}

/// Removes the folders `rels` under `root` that are empty, in order (the
/// deepest first, for a folder to be empty once those below are gone);
/// returns those removed. A folder holding anything stays.
pub(crate) fn remove_empty_dirs<'a>(
    root: &Path,
    rels: impl Iterator<Item = &'a str>,
) -> io::Result<Vec<String>> {
    let r = imp::Root::open(root)?;
    let mut removed = Vec::new();
    let mut failed = None;
    for rel in rels {
        let done = match &r {
            Some(r) => r.remove_empty_dir(rel),
            None => confined(root, rel).map(|at| {
                std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir())
                    && std::fs::remove_dir(&at).is_ok()
            }),
        };
        // One that cannot go (a link on its way) does not keep the others.
        match done {
            Ok(true) => removed.push(rel.to_string()),
            Ok(false) => {}
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// Sets modes (storage path, mode) under `root`; returns the failures.
pub(crate) fn set_modes<P: AsRef<str>>(
    root: &Path,
    modes: impl Iterator<Item = (P, u32)>,
) -> Vec<(String, io::Error)> {
    let r = match imp::Root::open(root) {
        Ok(r) => r,
        Err(e) => return vec![(root.display().to_string(), e)],
    };
    let mut failed = Vec::new();
    for (rel, mode) in modes {
        let rel = rel.as_ref();
        let done = match &r {
            Some(r) => r.set_mode(rel, mode),
            None => set_mode_by_path(root, rel, mode),
        };
        if let Err(e) = done {
            failed.push((rel.to_string(), e));
        }
    }
    failed
}

#[cfg(unix)]
fn set_mode_by_path(root: &Path, rel: &str, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = confined(root, rel)?;
    if std::fs::symlink_metadata(&path)?.file_type().is_symlink() {
        return Err(link_on_the_way(rel));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode_by_path(_: &Path, _: &str, _: u32) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A dropped file whose place the user took with a folder of their
    /// own (or whose folder they turned into a file) is left, not an error
    /// that fails every retry; the other dropped files still go.
    #[test]
    fn a_dropped_file_replaced_by_the_users_own_folder_is_left() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("d/p")).unwrap();
        std::fs::write(root.join("d/p/mine"), b"mine").unwrap();
        std::fs::write(root.join("d/q"), b"a file where a folder was").unwrap();
        std::fs::write(root.join("d/gone"), b"the share's").unwrap();
        remove_files(root, ["d/p", "d/q/x", "d/gone"].into_iter()).unwrap();
        assert_eq!(std::fs::read(root.join("d/p/mine")).unwrap(), b"mine");
        assert!(root.join("d/q").is_file());
        assert!(!root.join("d/gone").exists());
    }

    /// A link swapped in anywhere on the way is never followed: not to
    /// move a file into place, make a folder, remove a file or set a mode;
    /// what the link leads to is untouched. Without links the same calls
    /// do their work.
    #[test]
    fn nothing_passes_through_a_link_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("storage");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("dst")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("dst/sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), root.join("dst/file")).unwrap();
        let part = tmp.path().join("part");
        std::fs::write(&part, b"fetched").unwrap();

        let e = rename_into(&root, &part, "dst/sub/new.txt", false).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!outside.join("new.txt").exists());
        assert!(make_folder(&root, "dst/sub/deeper").is_err());
        assert!(!outside.join("deeper").exists());
        let e = remove_files(&root, ["dst/sub/victim"].into_iter()).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        let failed = set_modes(
            &root,
            [("dst/file", 0o777), ("dst/sub/victim", 0o777)].into_iter(),
        );
        assert_eq!(failed.len(), 2, "{failed:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(outside.join("victim"))
            .unwrap()
            .permissions()
            .mode();
        assert_ne!(mode & 0o777, 0o777);

        rename_into(&root, &part, "dst/a/b/new.txt", false).unwrap();
        assert_eq!(
            std::fs::read(root.join("dst/a/b/new.txt")).unwrap(),
            b"fetched"
        );
        make_folder(&root, "dst/empty/inner").unwrap();
        assert!(root.join("dst/empty/inner").is_dir());
        set_modes(&root, [("dst/a/b/new.txt", 0o600)].into_iter());
        let mode = std::fs::metadata(root.join("dst/a/b/new.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A link as the last component is itself replaced or removed.
        std::fs::write(&part, b"again").unwrap();
        rename_into(&root, &part, "dst/file", true).unwrap();
        assert_eq!(std::fs::read(root.join("dst/file")).unwrap(), b"again");
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        remove_files(&root, ["dst/a/b/new.txt", "dst/missing"].into_iter()).unwrap();
        assert!(!root.join("dst/a/b/new.txt").exists());
        // Folders: emptied ones go, deepest first; one through a link never.
        std::fs::create_dir_all(outside.join("gone/deeper")).unwrap();
        let err = remove_empty_dirs(&root, ["dst/sub/gone/deeper", "dst/sub/gone"].into_iter());
        assert!(err.is_err());
        assert!(outside.join("gone/deeper").is_dir());
        std::fs::write(root.join("dst/empty/kept.txt"), b"x").unwrap();
        let removed = remove_empty_dirs(
            &root,
            ["dst/a/b", "dst/a", "dst/empty/inner", "dst/empty"].into_iter(),
        )
        .unwrap();
        assert_eq!(removed, ["dst/a/b", "dst/a", "dst/empty/inner"]);
        assert!(root.join("dst/empty/kept.txt").exists());
    }
}
