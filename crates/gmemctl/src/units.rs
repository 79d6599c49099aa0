//! The command line's shared values, parsed once for every subcommand: sizes ("256M",
//! "1G"), durations ("1ms", "500us") and stop shares ("0.1"). Policies, mechanisms and
//! verification levels are the library's own words (gmem's `clap` feature).

use std::time::Duration;

/// A share of time in (0, 1], as `--max-stop-share` takes it.
pub fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if share > 0.0 && share <= 1.0 => Ok(share),
        _ => Err(format!("'{text}' is not a share in (0, 1], e.g. 0.1")),
    }
}

/// Parses a byte size with an optional binary suffix: K, M, G, T (also KiB, MiB, ...).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| {
        format!(
            "'{text}' is not a size: use a number with an optional K, M, G or T suffix, e.g. 256M"
        )
    })?;
    let shift = match suffix
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "'{text}' has an unknown size suffix: use K, M, G or T"
            ));
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses a duration with a unit: ns, us, ms or s.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let digits = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: f64 = number.parse().map_err(|_| {
        format!("'{text}' is not a duration: use a number and a unit, e.g. 1ms or 500us")
    })?;
    let seconds = match unit.trim() {
        "ns" => number / 1e9,
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "" => return Err(format!("'{text}' needs a unit: ns, us, ms or s")),
        other => {
            return Err(format!(
                "'{text}' has an unknown unit '{other}': use ns, us, ms or s"
            ));
        }
    };
    if !(seconds > 0.0 && seconds <= 3600.0) {
        return Err(format!("'{text}' must be positive and at most an hour"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(
            parse_size("1X")
                .unwrap_err()
                .contains("unknown size suffix")
        );
        assert!(parse_size("M").unwrap_err().contains("not a size"));
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("0ms").unwrap_err().contains("positive"));
        assert!(parse_duration("3h").unwrap_err().contains("unknown unit"));
    }
}
