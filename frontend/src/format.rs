//! Format strings of `format!`, `assert!` and `panic!`: `{}`, `{:?}`, `{0}`, `{name}`, `{:.3}`, `{{` and `}}`.

/// One piece of a format string.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Lit(String),
    Arg { arg: ArgRef, debug: bool, precision: Option<usize> },
}

/// Which argument a `{..}` refers to.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgRef {
    /// `{}`: the next positional argument.
    Next,
    /// `{0}`
    Index(usize),
    /// `{name}`: a named argument (`name = expr`) or, failing that, the variable in scope.
    Name(String),
}

/// Splits a format string into literal text and argument references.
pub fn parse(fmt: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '}' => return Err("unmatched `}` in format string (write `}}` for a literal brace)".into()),
            '{' => {
                let mut inner = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => inner.push(ch),
                        None => return Err("unclosed `{` in format string (write `{{` for a literal brace)".into()),
                    }
                }
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                pieces.push(parse_arg(&inner)?);
            }
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(pieces)
}

fn parse_arg(inner: &str) -> Result<Piece, String> {
    let (name, spec) = inner.split_once(':').unwrap_or((inner, ""));
    let name = name.trim();
    let arg = if name.is_empty() {
        ArgRef::Next
    } else if let Ok(i) = name.parse::<usize>() {
        ArgRef::Index(i)
    } else if name.chars().all(|c| c.is_alphanumeric() || c == '_') {
        ArgRef::Name(name.to_string())
    } else {
        return Err(format!("`{{{inner}}}` is not a valid argument reference"));
    };
    let (debug, precision) = match spec {
        "" => (false, None),
        "?" | "#?" => (true, None),
        s if s.starts_with('.') => {
            let (digits, debug) = s[1..].strip_suffix('?').map_or((&s[1..], false), |d| (d, true));
            let p = digits.parse::<usize>().map_err(|_| format!("bad precision in `{{{inner}}}`"))?;
            if p > crate::limits::MAX_PRECISION {
                return Err(format!(
                    "precision {p} in `{{{inner}}}` is larger than {} (MAX_PRECISION in {})",
                    crate::limits::MAX_PRECISION,
                    crate::limits::WHERE
                ));
            }
            (debug, Some(p))
        }
        _ => return Err(format!("format spec `:{spec}` is not supported (use {{}}, {{:?}} or {{:.N}})")),
    };
    Ok(Piece::Arg { arg, debug, precision })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pieces() {
        let p = parse("model.layers.{i}.{}{{x}} {0:?} {:.2}").expect("parses");
        assert_eq!(
            p,
            vec![
                Piece::Lit("model.layers.".into()),
                Piece::Arg { arg: ArgRef::Name("i".into()), debug: false, precision: None },
                Piece::Lit(".".into()),
                Piece::Arg { arg: ArgRef::Next, debug: false, precision: None },
                Piece::Lit("{x} ".into()),
                Piece::Arg { arg: ArgRef::Index(0), debug: true, precision: None },
                Piece::Lit(" ".into()),
                Piece::Arg { arg: ArgRef::Next, debug: false, precision: Some(2) },
            ]
        );
    }

    #[test]
    fn rejects_bad_strings() {
        assert!(parse("{").is_err());
        assert!(parse("}").is_err());
        assert!(parse("{:>5}").is_err());
    }
}
