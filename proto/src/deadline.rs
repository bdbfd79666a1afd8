//! A job's `deadline`: when its rows should be done, so the fleet scaler can size the fleet to
//! finish in time. Either a duration after submission (`"6h"`, `"90m"`, `"45s"`) or a time
//! (RFC 3339, `"2026-11-30T06:00:00Z"`).

/// The longest deadline after submission: a week.
const MAX_AFTER_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// Milliseconds after the job was submitted.
    After(u64),
    /// Milliseconds since the epoch.
    At(i64),
}

impl Deadline {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
            return Ok(Deadline::At(t.timestamp_millis()));
        }
        let unit_at = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{}` needs a unit (s, m or h)", crate::excerpt(text)))?;
        let (number, unit) = text.split_at(unit_at);
        let n: u64 = number.parse().map_err(|_| {
            format!(
                "`{}` is neither a duration (e.g. \"6h\", \"90m\") nor an RFC 3339 time",
                crate::excerpt(text)
            )
        })?;
        let ms_per = match unit {
            "s" => 1000,
            "m" => 60 * 1000,
            "h" => 3600 * 1000,
            _ => {
                return Err(format!(
                    "`{}`: unknown unit `{}` (s, m or h), and not an RFC 3339 time",
                    crate::excerpt(text),
                    crate::excerpt(unit)
                ));
            }
        };
        let ms = n.saturating_mul(ms_per);
        if ms == 0 || ms > MAX_AFTER_MS {
            return Err(format!(
                "`{}` must be more than 0 and at most 7 days after submission",
                crate::excerpt(text)
            ));
        }
        Ok(Deadline::After(ms))
    }

    /// The deadline of a job submitted at `created_at_ms`.
    pub fn at_ms(self, created_at_ms: i64) -> i64 {
        match self {
            Deadline::After(ms) => created_at_ms.saturating_add_unsigned(ms),
            Deadline::At(t) => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        assert_eq!(Deadline::parse("6h"), Ok(Deadline::After(6 * 3600 * 1000)));
        assert_eq!(Deadline::parse("90m"), Ok(Deadline::After(90 * 60 * 1000)));
        assert_eq!(Deadline::parse("45s").unwrap().at_ms(1000), 46_000);
        assert_eq!(
            Deadline::parse("1970-01-01T00:00:10Z"),
            Ok(Deadline::At(10_000))
        );
    }

    #[test]
    fn bad_deadlines_say_why() {
        assert!(Deadline::parse("6").unwrap_err().contains("needs a unit"));
        assert!(
            Deadline::parse("tomorrow")
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert!(
            Deadline::parse("6d")
                .unwrap_err()
                .contains("unknown unit `d`")
        );
        assert!(Deadline::parse("0s").unwrap_err().contains("more than 0"));
        assert!(Deadline::parse("200h").unwrap_err().contains("7 days"));
    }
}
