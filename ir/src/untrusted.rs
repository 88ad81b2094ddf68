//! Strings that come from files a user downloaded (GGUF keys, tensor names, JSON fields, template text) are shown in
//! messages only through [`show`]: control characters and invalid UTF-8 are escaped and the text is capped, so a
//! hostile file cannot flood the terminal or move its cursor.

use std::fmt::Write as _;

/// At most this many characters of an untrusted string appear in a message.
pub const MAX_SHOWN_CHARS: usize = 120;

/// `s` escaped (control and non-printing characters as `\n`, `\u{1b}`, …) and capped at [`MAX_SHOWN_CHARS`]
/// characters; a capped string ends with `…(N bytes)` giving its full length.
pub fn show(s: &str) -> String {
    show_with_len(s, s.len())
}

/// [`show`] of `s`, the start of an untrusted text of `total` bytes.
fn show_with_len(s: &str, total: usize) -> String {
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n == MAX_SHOWN_CHARS {
            let _ = write!(out, "…({total} bytes)");
            return out;
        }
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' || c == '\u{feff}' || c == '\u{200b}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if total > s.len() {
        let _ = write!(out, "…({total} bytes)");
    }
    out
}

/// [`show`] for raw bytes: invalid UTF-8 is shown as `\xNN`.
pub fn show_bytes(b: &[u8]) -> String {
    let head = &b[..b.len().min(MAX_SHOWN_CHARS * 4)];
    let lossy: String = head.utf8_chunks().fold(String::new(), |mut s, chunk| {
        s.push_str(chunk.valid());
        for x in chunk.invalid() {
            let _ = write!(s, "\\x{x:02x}");
        }
        s
    });
    show_with_len(&lossy, if b.len() > head.len() { b.len() } else { lossy.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(show("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J");
    }

    #[test]
    fn long_strings_are_capped_with_their_length() {
        let s = "x".repeat(90_000_000 / 1000);
        let shown = show(&s);
        assert!(shown.chars().count() < MAX_SHOWN_CHARS + 20, "{}", shown.len());
        assert!(shown.ends_with("…(90000 bytes)"), "{shown}");
    }

    #[test]
    fn invalid_utf8_is_shown_as_hex() {
        assert_eq!(show_bytes(b"ok\xff\x00"), "ok\\xff\\u{0}");
        let big = vec![b'a'; 10_000];
        assert!(show_bytes(&big).ends_with("(10000 bytes)"));
    }
}
