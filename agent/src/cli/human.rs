//! Numbers as people read them: binary sizes (KiB, MiB, GiB), one unit for
//! rates (MiB/s), and UTC dates instead of unix seconds.

/// `1536` → `1.5 KiB`; below 1 KiB, plain bytes.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Bytes over seconds, always in MiB/s (the one rate unit of the CLI).
pub(crate) fn rate(bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 {
        return "– MiB/s".into();
    }
    format!("{:.1} MiB/s", bytes as f64 / seconds / (1024.0 * 1024.0))
}

/// Unix seconds as `2027-01-31 23:59 UTC` (proleptic Gregorian calendar).
pub(crate) fn date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        secs / 3600,
        (secs % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_rates_and_dates_read_like_a_person_writes_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(25 << 20), "25.0 MiB");
        assert_eq!(bytes(300 << 20), "300 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(rate(10 << 20, 2.0), "5.0 MiB/s");
        assert_eq!(rate(1, 0.0), "– MiB/s");
        assert_eq!(date(0), "1970-01-01 00:00 UTC");
        assert_eq!(date(1_798_783_738), "2027-01-01 06:08 UTC");
        assert_eq!(date(951_782_400), "2000-02-29 00:00 UTC");
    }
}
