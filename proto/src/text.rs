//! Text that arrives from outside (API fields, worker reports, spec values): the rule for what
//! characters it may hold, and how much of it an error message repeats.

/// How many characters of a caller's value an error message repeats.
pub const EXCERPT_CHARS: usize = 64;

/// A value holding a character that no field accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{field}` holds a control character ({found}) at character {at}; only printable text is accepted"
)]
pub struct TextError {
    pub field: String,
    /// The character, escaped (`\u{0}`, `\n`).
    pub found: String,
    /// Its position, counted in characters from 0.
    pub at: usize,
}

/// Refuses NUL and every other control character (identifiers, URIs, keys, names).
pub fn check_text(field: &str, value: &str) -> Result<(), TextError> {
    check_chars(field, value, |_| false)
}

/// Refuses control characters except newlines and tabs (free text: error messages). Such text
/// is still logged as an escaped field, never raw.
pub fn check_free_text(field: &str, value: &str) -> Result<(), TextError> {
    check_chars(field, value, |c| matches!(c, '\n' | '\t' | '\r'))
}

/// Unicode's bidirectional control characters (UAX #9): they reorder how the text around them
/// is shown, so that a worker id or a message could read as another (CVE-2021-42574). No field
/// accepts them, free text included.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

fn check_chars(field: &str, value: &str, allowed: impl Fn(char) -> bool) -> Result<(), TextError> {
    match value
        .chars()
        .enumerate()
        .find(|&(_, c)| (c.is_control() && !allowed(c)) || is_bidi_control(c))
    {
        None => Ok(()),
        Some((at, c)) => Err(TextError {
            field: field.to_string(),
            found: c.escape_default().to_string(),
            at,
        }),
    }
}

/// The first `EXCERPT_CHARS` characters of `value`, control characters escaped, with the
/// length of the whole when it was cut: what an error message repeats of a caller's value.
pub fn excerpt(value: &str) -> String {
    let count = value.chars().count();
    let shown: String = value
        .chars()
        .take(EXCERPT_CHARS)
        .flat_map(|c| {
            if c.is_control() || is_bidi_control(c) {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if count > EXCERPT_CHARS {
        format!("{shown}... ({count} characters)")
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_refused_with_the_field_and_position() {
        assert!(check_text("worker_id", "w-1 ok é").is_ok());
        let e = check_text("worker_id", "ab\0c").unwrap_err();
        assert_eq!(e.field, "worker_id");
        assert_eq!(e.at, 2);
        assert!(e.to_string().contains("\\u{0}"), "{e}");
        assert!(check_text("uri", "a\nb").is_err());
        assert!(check_text("uri", "a\u{7f}b").is_err());
        assert!(check_free_text("message", "line 1\nline 2\tx").is_ok());
        assert!(check_free_text("message", "x\0").is_err());
        // Text-direction controls: `w1` followed by a right-to-left override reads as another id.
        for bidi in ['\u{202E}', '\u{2066}', '\u{200F}', '\u{061C}'] {
            let e = check_text("worker_id", &format!("w1{bidi}2w")).unwrap_err();
            assert_eq!(e.at, 2, "{bidi:?}");
            assert!(check_free_text("message", &format!("a{bidi}b")).is_err());
            assert!(!excerpt(&format!("a{bidi}b")).contains(bidi));
        }
        assert!(
            check_text("name", "مرحبا-שלום").is_ok(),
            "right-to-left letters themselves pass"
        );
        assert!(check_free_text("message", "\u{1b}[31m").is_err());
    }

    #[test]
    fn excerpts_are_short_and_escaped() {
        assert_eq!(excerpt("short"), "short");
        let long = "x".repeat(10_000);
        let e = excerpt(&long);
        assert!(e.len() < 100, "{e}");
        assert!(e.ends_with("(10000 characters)"));
        assert_eq!(excerpt("a\nb"), "a\\nb");
    }
}
