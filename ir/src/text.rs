//! The stable, human-readable text form of a graph, and its parser. `parse(print(g)) == g` (property-tested).
//!
//! ```text
//! graph "tiny" {
//!   %0 = param {name="model.embed_tokens.weight", role=frozen, init=load} : f32[128,64]
//!   %1 = input {name="input_ids"} : i32[2,8]
//!   %2 = embedding(%0, %1) : f32[2,8,64] ; model.embed_tokens
//!   output logits = %2
//! }
//! ```
//! Values are numbered in order; a node line is `%N = op(inputs) {attrs} : type`, optionally followed by `; label`.
//! Outputs: `output loss = %N`, `output logits = %N`, `output grad "param" = %N`, `output update "param" = %N`.
//! Kernel groups (after fusion): `kernel "name" = [%3, %4]`.

use crate::attr::{write_str_lit, AttrLit};
use crate::graph::{Graph, Node, Output, OutputKind, ValueId};
use crate::ops::Op;
use crate::types::{DType, Nf4Format, Type};
use std::fmt::Write;

/// Prints a graph in the text format.
pub fn print(g: &Graph) -> String {
    let mut out = String::new();
    out.push_str("graph ");
    write_str_lit(&g.name, &mut out);
    out.push_str(" {\n");
    for (i, n) in g.nodes.iter().enumerate() {
        let _ = write!(out, "  %{i} = {}", n.op.mnemonic());
        if !n.op.is_leaf() {
            out.push('(');
            for (j, v) in n.inputs.iter().enumerate() {
                if j > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{v}");
            }
            out.push(')');
        }
        let attrs = n.op.attrs();
        if !attrs.is_empty() {
            out.push_str(" {");
            for (j, (k, v)) in attrs.iter().enumerate() {
                if j > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{k}={v}");
            }
            out.push('}');
        }
        let _ = write!(out, " : {}", n.ty);
        if let Some(l) = &n.label {
            // Labels run to the end of the line: escape what would break it.
            let _ = write!(out, " ; {}", l.replace('\\', "\\\\").replace('\n', "\\n"));
        }
        out.push('\n');
    }
    for o in &g.outputs {
        out.push_str("  output ");
        match &o.kind {
            OutputKind::Loss => out.push_str("loss"),
            OutputKind::Logits => out.push_str("logits"),
            OutputKind::Grad(p) => {
                out.push_str("grad ");
                write_str_lit(p, &mut out);
            }
            OutputKind::Update(p) => {
                out.push_str("update ");
                write_str_lit(p, &mut out);
            }
            OutputKind::Metric(p) => {
                out.push_str("metric ");
                write_str_lit(p, &mut out);
            }
        }
        let _ = writeln!(out, " = {}", o.value);
    }
    for k in &g.kernels {
        out.push_str("  kernel ");
        write_str_lit(&k.name, &mut out);
        out.push_str(" = [");
        for (i, v) in k.nodes.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{v}");
        }
        out.push_str("]\n");
    }
    out.push_str("}\n");
    out
}

/// A parse error with its 1-based line and column.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{line}:{col}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Parses the text format. The result is not verified; run [`crate::verify::verify`] on it.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut g = Graph::default();
    let mut in_graph = false;
    let mut closed = false;
    for (ln, raw) in text.lines().enumerate() {
        let line_no = ln + 1;
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = raw.len() - trimmed.len();
        let mut c = Cursor { s: raw, pos: indent, line: line_no };
        if !in_graph {
            c.keyword("graph")?;
            g.name = c.string()?;
            c.punct('{')?;
            c.end()?;
            in_graph = true;
        } else if closed {
            return Err(c.err("text after the closing `}`"));
        } else if trimmed.starts_with('}') {
            c.punct('}')?;
            c.end()?;
            closed = true;
        } else if trimmed.starts_with("kernel") {
            c.keyword("kernel")?;
            let name = c.string()?;
            c.punct('=')?;
            c.punct('[')?;
            let mut nodes = Vec::new();
            if c.peek() != Some(']') {
                loop {
                    nodes.push(c.value_id()?);
                    if c.peek() == Some(',') {
                        c.punct(',')?;
                    } else {
                        break;
                    }
                }
            }
            c.punct(']')?;
            c.end()?;
            g.kernels.push(crate::graph::Kernel { name, nodes });
        } else if trimmed.starts_with("output") {
            c.keyword("output")?;
            let kind = match c.word()?.as_str() {
                "loss" => OutputKind::Loss,
                "logits" => OutputKind::Logits,
                "grad" => OutputKind::Grad(c.string()?),
                "update" => OutputKind::Update(c.string()?),
                "metric" => OutputKind::Metric(c.string()?),
                w => return Err(c.err(&format!("unknown output kind `{w}` (loss, logits, grad, update, metric)"))),
            };
            c.punct('=')?;
            let value = c.value_id()?;
            c.end()?;
            g.outputs.push(Output { kind, value });
        } else {
            let node = parse_node(&mut c, g.nodes.len())?;
            g.nodes.push(node);
        }
    }
    if !closed {
        return Err(ParseError {
            line: text.lines().count(),
            col: 1,
            message: "missing `graph \"..\" {` ... `}`".into(),
        });
    }
    Ok(g)
}

fn parse_node(c: &mut Cursor, index: usize) -> Result<Node, ParseError> {
    let id = c.value_id()?;
    if id.index() != index {
        return Err(c.err(&format!("expected %{index} (values are numbered in order), found {id}")));
    }
    c.punct('=')?;
    let op_col = c.pos;
    let mnemonic = c.word()?;
    let mut inputs = Vec::new();
    if c.peek() == Some('(') {
        c.punct('(')?;
        if c.peek() != Some(')') {
            loop {
                inputs.push(c.value_id()?);
                if c.peek() == Some(',') {
                    c.punct(',')?;
                } else {
                    break;
                }
            }
        }
        c.punct(')')?;
    }
    let mut attrs = Vec::new();
    if c.peek() == Some('{') {
        c.punct('{')?;
        if c.peek() != Some('}') {
            loop {
                let k = c.word()?;
                c.punct('=')?;
                attrs.push((k, c.literal()?));
                if c.peek() == Some(',') {
                    c.punct(',')?;
                } else {
                    break;
                }
            }
        }
        c.punct('}')?;
    }
    let op = Op::from_parts(&mnemonic, &attrs).map_err(|m| ParseError { line: c.line, col: op_col + 1, message: m })?;
    c.punct(':')?;
    let ty = c.ty()?;
    let label = if c.peek() == Some(';') {
        c.punct(';')?;
        // One space separates `;` from the label, which runs verbatim to the end of the line.
        let rest = &c.s[c.pos..];
        let l = unescape_label(rest.strip_prefix(' ').unwrap_or(rest));
        c.pos = c.s.len();
        Some(l)
    } else {
        None
    };
    c.end()?;
    Ok(Node { op, inputs, ty, label })
}

fn unescape_label(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => out.push('\\'),
            },
            (c, false) => out.push(c),
        }
    }
    out
}

/// `f32`, `nf4<64,256>`, ... from a word and its `<..>` arguments.
pub(crate) fn dtype_from_word(w: &str, args: &[AttrLit]) -> Result<DType, String> {
    let int = |a: &AttrLit| match a {
        AttrLit::Int(i) if *i > 0 && *i <= u32::MAX as i128 => Ok(*i as u32),
        other => Err(format!("expected a positive integer in nf4<..>, found {other:?}")),
    };
    match (w, args.len()) {
        ("f32", 0) => Ok(DType::F32),
        ("bf16", 0) => Ok(DType::BF16),
        ("f16", 0) => Ok(DType::F16),
        ("i32", 0) => Ok(DType::I32),
        ("nf4", 1) => Ok(DType::Nf4(Nf4Format { block: int(&args[0])?, double_quant: None })),
        ("nf4", 2) => Ok(DType::Nf4(Nf4Format { block: int(&args[0])?, double_quant: Some(int(&args[1])?) })),
        _ => Err(format!("unknown dtype `{w}` (f32, bf16, f16, i32, nf4<block>, nf4<block,block2>)")),
    }
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
    line: usize,
}

impl Cursor<'_> {
    fn err(&self, m: &str) -> ParseError {
        ParseError { line: self.line, col: self.pos + 1, message: m.to_string() }
    }
    fn skip_ws(&mut self) {
        while self.s[self.pos..].starts_with([' ', '\t', '\r']) {
            self.pos += 1;
        }
    }
    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.s[self.pos..].chars().next()
    }
    fn punct(&mut self, p: char) -> Result<(), ParseError> {
        if self.peek() == Some(p) {
            self.pos += p.len_utf8();
            Ok(())
        } else {
            Err(self.err(&format!("expected `{p}`")))
        }
    }
    fn end(&mut self) -> Result<(), ParseError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.err("unexpected text at the end of the line")),
        }
    }
    fn word(&mut self) -> Result<String, ParseError> {
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let n = rest.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')).unwrap_or(rest.len());
        if n == 0 || rest.starts_with(|ch: char| ch.is_ascii_digit()) {
            return Err(self.err("expected a name"));
        }
        self.pos += n;
        Ok(rest[..n].to_string())
    }
    fn keyword(&mut self, k: &str) -> Result<(), ParseError> {
        let at = self.pos;
        match self.word() {
            Ok(w) if w == k => Ok(()),
            _ => {
                self.pos = at;
                Err(self.err(&format!("expected `{k}`")))
            }
        }
    }
    fn string(&mut self) -> Result<String, ParseError> {
        self.punct('"').map_err(|_| self.err("expected a string"))?;
        let mut out = String::new();
        let mut chars = self.s[self.pos..].char_indices();
        while let Some((i, ch)) = chars.next() {
            match ch {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, c)) => out.push(c),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(self.err("unterminated string"))
    }
    fn value_id(&mut self) -> Result<ValueId, ParseError> {
        self.punct('%').map_err(|_| self.err("expected a value like %3"))?;
        let rest = &self.s[self.pos..];
        let n = rest.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(rest.len());
        let v = rest[..n].parse::<u32>().map_err(|_| self.err("expected a value number after %"))?;
        self.pos += n;
        Ok(ValueId(v))
    }
    fn number(&mut self) -> Result<AttrLit, ParseError> {
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let mut n = 0;
        for (i, ch) in rest.char_indices() {
            let sign_ok = (ch == '-' || ch == '+') && (i == 0 || rest[..i].ends_with(['e', 'E']));
            if ch.is_ascii_alphanumeric() || ch == '.' || sign_ok {
                n = i + ch.len_utf8();
            } else {
                break;
            }
        }
        let t = &rest[..n];
        self.pos += n;
        if let Ok(i) = t.parse::<i128>() {
            return Ok(AttrLit::Int(i));
        }
        t.parse::<f64>().map(AttrLit::Float).map_err(|_| self.err(&format!("bad number `{t}`")))
    }
    fn literal(&mut self) -> Result<AttrLit, ParseError> {
        match self.peek() {
            Some('"') => Ok(AttrLit::Str(self.string()?)),
            Some('[') => {
                self.punct('[')?;
                let mut items = Vec::new();
                if self.peek() != Some(']') {
                    loop {
                        items.push(self.literal()?);
                        if self.peek() == Some(',') {
                            self.punct(',')?;
                        } else {
                            break;
                        }
                    }
                }
                self.punct(']')?;
                Ok(AttrLit::List(items))
            }
            Some(ch) if ch.is_ascii_digit() || ch == '-' || ch == '+' || ch == '.' => self.number(),
            Some(_) => {
                let w = self.word()?;
                match w.as_str() {
                    "true" => return Ok(AttrLit::Bool(true)),
                    "false" => return Ok(AttrLit::Bool(false)),
                    "inf" => return Ok(AttrLit::Float(f64::INFINITY)),
                    "NaN" => return Ok(AttrLit::Float(f64::NAN)),
                    _ => {}
                }
                let close = match self.peek() {
                    Some('(') => ')',
                    Some('<') => '>',
                    _ => return Ok(AttrLit::Word(w, vec![])),
                };
                self.pos += 1;
                let mut args = Vec::new();
                loop {
                    args.push(self.literal()?);
                    if self.peek() == Some(',') {
                        self.punct(',')?;
                    } else {
                        break;
                    }
                }
                self.punct(close)?;
                Ok(AttrLit::Word(w, args))
            }
            None => Err(self.err("expected a value")),
        }
    }
    fn ty(&mut self) -> Result<Type, ParseError> {
        let at = self.pos;
        let lit = self.literal()?;
        let dtype = match &lit {
            AttrLit::Word(w, args) => dtype_from_word(w, args).map_err(|m| self.err(&m))?,
            _ => {
                self.pos = at;
                return Err(self.err("expected a type like f32[2,3]"));
            }
        };
        let shape = match self.literal()? {
            AttrLit::List(items) => items
                .iter()
                .map(|i| match i {
                    AttrLit::Int(d) if *d >= 0 => Ok(*d as usize),
                    _ => Err(self.err("dimensions are non-negative integers")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(self.err("expected a shape like [2,3]")),
        };
        Ok(Type::new(dtype, shape))
    }
}
