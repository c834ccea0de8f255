//! RFC 3339 timestamps on the command line (`phxq seek --to time:2024-05-01T12:00:00Z`), turned
//! into the milliseconds since the Unix epoch that message times are counted in.
//!
//! Small on purpose (no date crate for one argument): `YYYY-MM-DDTHH:MM:SS[.fraction]` then `Z`
//! or an offset `+HH:MM` / `-HH:MM`, with `T`/`Z` in either case (RFC 3339 §5.6). Digits of a
//! fraction beyond milliseconds are dropped (rounded down). Refused: anything else, dates that
//! do not exist (2023-02-29), leap seconds (`:60`, which Unix time does not count), and times
//! before 1970 or after [`TIME_MS_MAX`].

use phxq_types::TIME_MS_MAX;

/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;

/// The milliseconds since the Unix epoch that `text` (an RFC 3339 date-time) names.
pub fn parse_rfc3339_ms(text: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!("{text:?}: {why} (expected an RFC 3339 time like 2024-05-01T12:00:00.250Z)")
    };
    let bytes = text.as_bytes();
    if bytes.len() < 20 {
        return Err(bad("too short"));
    }
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, byte)| bytes[at] != byte) || !matches!(bytes[10], b'T' | b't') {
        return Err(bad("not YYYY-MM-DDTHH:MM:SS"));
    }
    let field =
        |from: usize, to: usize| digits(&bytes[from..to]).ok_or_else(|| bad("not a number"));
    let (year, month, day) = (field(0, 4)?, field(5, 7)?, field(8, 10)?);
    let (hour, minute, second) = (field(11, 13)?, field(14, 16)?, field(17, 19)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("no such time of day (leap seconds are not supported)"));
    }
    let (millis, zone) = fraction(&bytes[19..]).ok_or_else(|| bad("bad fraction of a second"))?;
    let offset_ms =
        zone_offset_ms(zone).ok_or_else(|| bad("expected Z or an offset like +02:00"))?;
    let local_ms = days_from_civil(year, month, day) * DAY_MS
        + (hour * 3_600_000 + minute * 60_000 + second * 1_000 + millis);
    let utc_ms = local_ms - offset_ms;
    let max = i64::try_from(TIME_MS_MAX).expect("fits");
    if !(0..=max).contains(&utc_ms) {
        return Err(bad(
            "outside 1970-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z",
        ));
    }
    Ok(u64::try_from(utc_ms).expect("checked non-negative"))
}

/// The value of a run of ASCII digits (at most 4 here), or `None`.
fn digits(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        bytes
            .iter()
            .fold(0, |value, digit| value * 10 + i64::from(digit - b'0')),
    )
}

/// An optional `.digits` (as whole milliseconds, rounded down) and the rest of the input.
fn fraction(rest: &[u8]) -> Option<(i64, &[u8])> {
    let Some(after_dot) = rest.strip_prefix(b".") else {
        return Some((0, rest));
    };
    let count = after_dot.iter().take_while(|b| b.is_ascii_digit()).count();
    if count == 0 {
        return None;
    }
    let mut millis = [b'0'; 3];
    let kept = count.min(3);
    millis[..kept].copy_from_slice(&after_dot[..kept]);
    Some((digits(&millis)?, &after_dot[count..]))
}

/// The zone's offset from UTC in ms (`Z` is 0, `+02:00` is two hours), or `None`.
fn zone_offset_ms(zone: &[u8]) -> Option<i64> {
    match zone {
        [b'Z' | b'z'] => Some(0),
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = digits(&[*h1, *h2])?;
            let minutes = digits(&[*m1, *m2])?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = (hours * 60 + minutes) * 60_000;
            Some(if *sign == b'-' { -offset } else { offset })
        }
        _ => None,
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given date of the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`: years counted from March, so the leap day ends a year).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use phxq_types::Rng;

    use super::*;

    #[test]
    fn known_instants() {
        let cases = [
            ("1970-01-01T00:00:00Z", 0),
            ("1970-01-01T00:00:00.001Z", 1),
            ("2000-01-01T00:00:00Z", 946_684_800_000),
            ("2000-01-01t00:00:00z", 946_684_800_000),
            ("2000-01-01T01:00:00+01:00", 946_684_800_000),
            ("1999-12-31T19:30:00-04:30", 946_684_800_000),
            ("2024-02-29T12:00:00.5Z", 1_709_208_000_500),
            ("2024-02-29T12:00:00.25Z", 1_709_208_000_250),
            ("2024-02-29T12:00:00.123999Z", 1_709_208_000_123),
            ("9999-12-31T23:59:59.999Z", TIME_MS_MAX),
        ];
        for (text, ms) in cases {
            assert_eq!(parse_rfc3339_ms(text), Ok(ms), "{text}");
        }
    }

    #[test]
    fn malformed_or_impossible_times_are_refused() {
        for text in [
            "",
            "2000-01-01",
            "2000-01-01T00:00:00",
            "2000-01-01 00:00:00Z",
            "2000/01/01T00:00:00Z",
            "2000-1-01T00:00:00Z",
            "+2000-01-01T00:00:00Z",
            "2000-01-01T00:00:00.Z",
            "2000-01-01T00:00:00,5Z",
            "2000-01-01T00:00:00ZZ",
            "2000-01-01T00:00:00+1:00",
            "2000-01-01T00:00:00+01",
            "2000-01-01T00:00:00+24:00",
            "2000-13-01T00:00:00Z",
            "2000-00-01T00:00:00Z",
            "2000-01-00T00:00:00Z",
            "2000-04-31T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2000-01-01T24:00:00Z",
            "2000-01-01T23:60:00Z",
            "2016-12-31T23:59:60Z",
            "1969-12-31T23:59:59.999Z",
            "1970-01-01T00:30:00+01:00",
            "9999-12-31T23:59:59-00:01",
            "10000-01-01T00:00:00Z",
            "2000-01-01T00:00:00é",
            "２000-01-01T00:00:00Z",
        ] {
            assert!(parse_rfc3339_ms(text).is_err(), "{text:?} was accepted");
        }
    }

    /// Days from 1970-01-01 counted one year and one month at a time: slow and obviously right.
    fn days_by_counting(year: i64, month: i64, day: i64) -> i64 {
        let years: i64 = (1970..year)
            .map(|y| if is_leap(y) { 366 } else { 365 })
            .sum();
        let months: i64 = (1..month).map(|m| days_in_month(year, m)).sum();
        years + months + day - 1
    }

    #[test]
    fn every_date_agrees_with_counting_days() {
        let mut rng = Rng::new(4);
        for _ in 0..2_000 {
            let year = 1970 + rng.below(8030) as i64;
            let month = 1 + rng.below(12) as i64;
            let day = 1 + rng.below(days_in_month(year, month) as u64) as i64;
            let (hour, minute, second) = (rng.below(24), rng.below(60), rng.below(60));
            let millis = rng.below(1000);
            let text = format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z"
            );
            let expected = days_by_counting(year, month, day) as u64 * 86_400_000
                + ((hour * 60 + minute) * 60 + second) * 1000
                + millis;
            assert_eq!(parse_rfc3339_ms(&text), Ok(expected), "{text}");
        }
    }
}
