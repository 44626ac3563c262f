//! Small helpers every layer uses: the clock, hex text, numbers from
//! the environment, and whether bytes are all zeros. One place each, so every record, path and URL spells
//! time and bytes the same way, and every `CARAVAN_*` knob is read alike.

/// A positive whole number from the environment variable `name` (tuning
/// knobs and limits), else `default` (unset, not a number, or zero).
pub fn env_positive(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

/// A positive duration in seconds (fractions allowed) from the environment
/// variable `name`, if set to one a `Duration` can hold.
pub fn env_secs(name: &str) -> Option<std::time::Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .and_then(|v| std::time::Duration::try_from_secs_f64(v).ok())
}

/// Text a remote party sent (a peer's refusal, a repository's error
/// body), made safe to print and log: decoded lossily, control characters
/// escaped (no terminal escape sequence, no forged log line), and cut to
/// [`PEER_TEXT_MAX`] characters.
pub fn peer_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == PEER_TEXT_MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters of a remote party's text kept by [`peer_text`].
pub const PEER_TEXT_MAX: usize = 300;

/// Seconds since the Unix epoch (0 if the clock is before 1970), the time
/// base of every validity window.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970); used
/// as a sequence number that grows across restarts.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Lowercase hex of some bytes (storage paths and URLs use it).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses exactly 64 hex characters (either case) into 32 bytes.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Whether `bytes` are all zeros (a run of a sparse file or disk image),
/// checked 4 KiB at a time (each block's bytes or-ed together, which
/// vectorizes) and stopping at the first block that holds anything else:
/// other data pays for one block.
pub fn all_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(4096)
        .all(|b| b.iter().fold(0u8, |acc, x| acc | x) == 0)
}

/// The bytes the files and folders under `root` take on disk (allocated
/// blocks, as `du` and the kubelet count them), links not followed; an
/// entry that vanishes meanwhile counts nothing.
pub fn allocated_bytes(root: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if meta.is_dir() {
                dirs.push(e.path());
            }
        }
    }
    total
}

/// Opens a local file for reading without waiting on it: `O_NONBLOCK`, so
/// a FIFO put where a file was (by the user, or by anyone who can write
/// the folder) does not block the open until a writer comes, holding a
/// blocking thread, a fetch and the daemon's shutdown for ever. Reads
/// and syncs of a regular file or a folder are not affected by the flag.
#[cfg(feature = "node")]
pub fn open_no_wait(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
}

/// Opens a local file for reading if it is a regular file (checked on the
/// opened descriptor, so a swap after any earlier look is caught), without
/// waiting on it ([`open_no_wait`]). Anything else (a FIFO, a device, a
/// socket, a folder) is refused with `InvalidInput`, naming its type.
#[cfg(feature = "node")]
pub fn open_regular(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let f = open_no_wait(path)?;
    let t = f.metadata()?.file_type();
    if t.is_file() {
        return Ok(f);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "{} is {}, not a regular file",
            path.display(),
            file_type_said(t)
        ),
    ))
}

/// A file type in words, for refusals ("a FIFO (named pipe)").
pub fn file_type_said(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a file"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guarantee: a remote party's text cannot drive the terminal or
    /// forge a log line, and is bounded.
    #[test]
    fn a_peers_text_is_printable_and_bounded() {
        let said = peer_text(b"\x1b[2J\x1b]0;PWNED\x07\nERROR fake log line\r");
        assert!(!said.chars().any(char::is_control), "{said:?}");
        assert!(
            said.contains("\\u{1b}[2J") && said.contains("\\nERROR"),
            "{said}"
        );
        assert_eq!(peer_text(&[b'a'; 5000]).chars().count(), PEER_TEXT_MAX + 1);
        assert_eq!(peer_text("ok: ünïcode".as_bytes()), "ok: ünïcode");
    }

    /// Guarantee: a FIFO where a file is expected is refused at once,
    /// never waited on (a blocked open held a fetch, `cancel` and the
    /// daemon's shutdown until something wrote to the pipe).
    #[cfg(feature = "node")]
    #[test]
    fn a_fifo_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let e = super::open_regular(&fifo).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert!(super::open_no_wait(&fifo).is_ok());
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(super::open_regular(&file).is_ok());
        assert!(super::open_regular(dir.path()).is_err());
    }
}
