//! The evaluator: a tree-walking interpreter over syn's AST. Statements and expressions are evaluated in order;
//! functions get a frame of nested scopes; `return`/`break`/`continue` and errors travel as [`Ctrl`] through `?`.
//! Built-in functions and methods live in `builtins.rs` (plain values), `tensor.rs` (graph building) and
//! `recipe.rs` (the `Recipe` builder).

use crate::builtins::{self, Args};
use crate::diag::{did_you_mean, DiagKind, Error, FileId, SourceMap, Span};
use crate::format::{self, ArgRef, Piece};
use crate::ops::{self, BinOp};
use crate::peft::targets::Targets;
use crate::program::{FnDef, Program};
use crate::tensor;
use crate::ty::Ty;
use crate::value::{Field, Str, StructVal, Value};
use std::collections::HashMap;
use std::rc::Rc;
use syn::parse::ParseStream;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;

use crate::limits::{self, Budget, MAX_CALL_DEPTH, MAX_EVAL_DEPTH, MAX_STEPS, MAX_VALUE_DEPTH};

/// Why evaluation left the normal path.
#[derive(Debug)]
pub enum Ctrl {
    Err(Error),
    Return(Value),
    Break(Value),
    Continue,
}

impl From<Error> for Ctrl {
    fn from(e: Error) -> Ctrl {
        Ctrl::Err(e)
    }
}

pub type R<T> = Result<T, Ctrl>;

#[derive(Debug)]
struct Binding {
    name: String,
    value: Value,
    mutable: bool,
}

/// One function activation.
#[derive(Debug)]
struct Frame {
    file: FileId,
    scopes: Vec<Vec<Binding>>,
    /// The callee's span at the call that made this frame.
    call: Option<Span>,
}

/// A place that can be assigned: a variable and a path of fields and indices into it.
enum Step {
    Field(String, Span),
    Index(i64, Span),
}

/// The interpreter state for one compilation.
pub struct Interp<'a> {
    pub prog: &'a Program<'a>,
    pub sources: &'a SourceMap,
    frames: Vec<Frame>,
    /// The graph being built, while a model's forward function runs.
    pub builder: Option<ir::Builder>,
    consts: HashMap<String, Value>,
    /// While an `assert!` condition is evaluated: the struct fields it reads, with where they were written.
    blame: Option<Vec<(Span, String)>>,
    /// Steps and bytes used so far (`limits.rs`).
    pub budget: Budget,
    /// Nested `expr` evaluations in progress.
    depth: usize,
    /// Names given to `param(..)` so far (duplicate declarations are checked against it).
    pub param_names: std::collections::HashSet<Rc<str>>,
}

impl<'a> Interp<'a> {
    /// An interpreter whose top level is `root` (the recipe file).
    pub fn new(prog: &'a Program<'a>, sources: &'a SourceMap, root: FileId) -> Interp<'a> {
        Interp {
            prog,
            sources,
            frames: vec![Frame { file: root, scopes: vec![vec![]], call: None }],
            builder: None,
            consts: HashMap::new(),
            blame: None,
            budget: Budget::default(),
            depth: 0,
            param_names: Default::default(),
        }
    }

    /// The file being evaluated.
    pub fn file(&self) -> FileId {
        self.frames.last().map_or(FileId(0), |f| f.file)
    }

    /// Span of a syntax node of the file being evaluated.
    pub fn sp<T: Spanned>(&self, t: &T) -> Span {
        Span::of(self.file(), t.span())
    }

    /// The innermost call site in a user (non-library) file, if any: where the user asked for what is being built.
    pub fn user_call_site(&self) -> Option<Span> {
        self.frames.iter().rev().filter_map(|f| f.call).find(|s| !self.sources.is_library(s.file))
    }

    // ---- variables ---------------------------------------------------------------------------------------------

    fn scopes(&mut self) -> &mut Vec<Vec<Binding>> {
        if self.frames.is_empty() {
            self.frames.push(Frame { file: FileId(0), scopes: vec![vec![]], call: None });
        }
        let last = self.frames.len() - 1;
        &mut self.frames[last].scopes
    }

    fn lookup(&self, name: &str) -> Option<&Binding> {
        let frame = self.frames.last()?;
        frame.scopes.iter().rev().flat_map(|s| s.iter().rev()).find(|b| b.name == name)
    }

    fn define(&mut self, name: String, value: Value, mutable: bool) {
        let scopes = self.scopes();
        if scopes.is_empty() {
            scopes.push(vec![]);
        }
        if let Some(s) = scopes.last_mut() {
            s.push(Binding { name, value, mutable });
        }
    }

    fn local_names(&self) -> Vec<String> {
        self.frames.last().map_or(vec![], |f| f.scopes.iter().flatten().map(|b| b.name.clone()).collect())
    }

    // ---- calls -------------------------------------------------------------------------------------------------

    /// Calls a `fn` of the program by name (used by the recipe compiler to run a model's forward function).
    pub fn call_named(&mut self, name: &str, args: Vec<Value>, call: Span) -> Result<Value, Error> {
        let prog = self.prog;
        match prog.fns.get(name) {
            Some(def) => {
                let spans = vec![call; args.len()];
                self.call_fn(def, None, args, &spans, call, name)
            }
            None => Err(Error::new(DiagKind::UnknownFunction, call, format!("cannot find function `{name}`"))),
        }
    }

    /// Calls a DSL function: checks and binds the arguments, runs the body, checks the result. Errors get this
    /// call appended to their trace; the builder's label is restored when the function returns.
    pub fn call_fn(
        &mut self,
        def: &'a FnDef<'a>,
        this: Option<Value>,
        args: Vec<Value>,
        spans: &[Span],
        call: Span,
        callee: &str,
    ) -> Result<Value, Error> {
        if def.params.len() != args.len() {
            let n = def.params.len();
            let msg = format!(
                "`{callee}` takes {n} argument{} but {} {} supplied",
                if n == 1 { "" } else { "s" },
                args.len(),
                if args.len() == 1 { "was" } else { "were" }
            );
            return Err(Error::new(DiagKind::WrongArgCount, call, msg).label(format!("expected {n}")));
        }
        if self.frames.len() > MAX_CALL_DEPTH {
            return Err(limits::limit(
                call,
                format!("calls nest deeper than {MAX_CALL_DEPTH} (runaway recursion?)"),
                "the call depth limit was reached here",
                "MAX_CALL_DEPTH",
            ));
        }
        let mut checked = Vec::with_capacity(args.len());
        for ((p, v), s) in def.params.iter().zip(args).zip(spans) {
            // Checking a list's declared type visits (and may copy) every element.
            self.budget.steps(measure(&v).slots, *s)?;
            let v = p.ty.check(v).map_err(|m| {
                Error::new(DiagKind::WrongType, *s, format!("wrong argument type for `{callee}`: {m}"))
                    .label(format!("expected `{}`", p.ty))
            })?;
            checked.push(v);
        }
        let label = self.builder.as_ref().and_then(|b| b.label().map(str::to_string));
        self.frames.push(Frame { file: def.file, scopes: vec![vec![]], call: Some(call) });
        if let Some(this) = this {
            self.define("self".into(), this, false);
        }
        let mut out = Ok(Value::Unit);
        for (p, v) in def.params.iter().zip(checked) {
            if let Err(e) = self.bind(p.pat, v) {
                out = Err(e);
                break;
            }
        }
        if out.is_ok() {
            out = self.block(def.body);
        }
        self.frames.pop();
        if let Some(b) = &mut self.builder {
            b.set_label(label);
        }
        let v = match out {
            Ok(v) | Err(Ctrl::Return(v)) => v,
            Err(Ctrl::Err(mut e)) => {
                e.trace.push((call, format!("in this call to `{callee}`")));
                return Err(e);
            }
            Err(Ctrl::Break(_) | Ctrl::Continue) => {
                return Err(Error::new(DiagKind::Unsupported, def.span, "`break` or `continue` outside of a loop"))
            }
        };
        def.ret.check(v).map_err(|m| {
            let mut e = Error::new(DiagKind::WrongType, def.span, format!("`{callee}` returns the wrong type: {m}"));
            e.trace.push((call, format!("in this call to `{callee}`")));
            e
        })
    }

    fn args(&mut self, exprs: &Punctuated<syn::Expr, syn::Token![,]>) -> R<(Vec<Value>, Vec<Span>)> {
        let mut vals = Vec::with_capacity(exprs.len());
        let mut spans = Vec::with_capacity(exprs.len());
        for e in exprs {
            spans.push(self.sp(e));
            vals.push(self.expr(e)?);
        }
        Ok((vals, spans))
    }

    fn call(&mut self, c: &syn::ExprCall) -> R<Value> {
        let syn::Expr::Path(p) = &*c.func else {
            return Err(self.unsupported(&c.func, "only named functions can be called").into());
        };
        let fspan = self.sp(&c.func);
        let (vals, spans) = self.args(&c.args)?;
        let segs: Vec<String> = p.path.segments.iter().map(|s| s.ident.to_string()).collect();
        let prog = self.prog;
        match segs.as_slice() {
            [name] => {
                let target = match self.lookup(name) {
                    Some(Binding { value: Value::Fn(f), .. }) => f.to_string(),
                    _ => name.clone(),
                };
                if let Some(def) = prog.fns.get(&target) {
                    return Ok(self.call_fn(def, None, vals, &spans, fspan, &target)?);
                }
                if let Some(f) = builtins::function(name) {
                    let args = Args { vals, spans, call: fspan, name: name.clone() };
                    return Ok(f(self, &args)?);
                }
                let mut candidates: Vec<String> = prog.fn_names().map(str::to_string).collect();
                candidates.extend(builtins::function_names().map(str::to_string));
                Err(Error::new(DiagKind::UnknownFunction, fspan, format!("cannot find function `{name}`"))
                    .label("not found in this file, the model library or the prelude")
                    .maybe_help(did_you_mean(name, candidates.iter().map(String::as_str)))
                    .into())
            }
            [ty, name] => {
                if let Some(def) = prog.methods.get(&(ty.clone(), name.clone())) {
                    let (this, vals, spans) = if def.has_self && !vals.is_empty() {
                        (Some(vals[0].clone()), vals[1..].to_vec(), spans[1..].to_vec())
                    } else {
                        (None, vals, spans)
                    };
                    return Ok(self.call_fn(def, this, vals, &spans, fspan, &format!("{ty}::{name}"))?);
                }
                let args = Args { vals, spans, call: fspan, name: format!("{ty}::{name}") };
                if let Some(r) = builtins::assoc(self, ty, name, &args) {
                    return Ok(r?);
                }
                Err(Error::new(DiagKind::UnknownFunction, fspan, format!("cannot find function `{ty}::{name}`"))
                    .label("no such associated function")
                    .into())
            }
            _ => Err(self.unsupported(&c.func, "paths with more than two segments are not supported").into()),
        }
    }

    fn method_call(&mut self, m: &syn::ExprMethodCall) -> R<Value> {
        let name = m.method.to_string();
        let mspan = self.sp(&m.method);
        if builtins::MUTATING_METHODS.contains(&name.as_str()) {
            return self.mutating_method(m, &name, mspan);
        }
        let recv = self.expr(&m.receiver)?;
        let (vals, spans) = self.args(&m.args)?;
        if let Value::Struct(s) = &recv {
            let prog = self.prog;
            if let Some(def) = prog.methods.get(&(s.name.clone(), name.clone())).filter(|d| d.has_self) {
                let callee = format!("{}::{name}", s.name);
                return Ok(self.call_fn(def, Some(recv), vals, &spans, mspan, &callee)?);
            }
        }
        let args = Args { vals, spans, call: mspan, name };
        let r = match &recv {
            Value::Recipe(r) => crate::recipe::method(self, r, &args),
            Value::Tensor(t) => tensor::method(self, *t, &args),
            _ => builtins::method(self, &recv, &args),
        };
        Ok(r?)
    }

    /// `xs.push(v)` and friends: methods that change the receiver, which must be a `mut` place.
    fn mutating_method(&mut self, m: &syn::ExprMethodCall, name: &str, mspan: Span) -> R<Value> {
        let (root, steps) = self.place(&m.receiver)?;
        let (vals, spans) = self.args(&m.args)?;
        let args = Args { vals, spans, call: mspan, name: name.to_string() };
        let (depth, slots) =
            args.vals.iter().map(measure).fold((0, 0u64), |(d, n), m| (d.max(m.depth), n.saturating_add(m.slots)));
        self.budget.steps(slots, mspan)?;
        self.budget.bytes(slots.saturating_mul(limits::SLOT_BYTES), mspan)?;
        check_value_depth(steps.len() + 1 + depth, mspan)?;
        let target = self.place_mut(&root, &steps, self.sp(&m.receiver))?;
        let (v, bytes) = builtins::mutate(target, &args)?;
        self.budget.bytes(bytes, mspan)?;
        Ok(v)
    }

    // ---- blocks and statements ---------------------------------------------------------------------------------

    fn block(&mut self, b: &syn::Block) -> R<Value> {
        self.scopes().push(vec![]);
        let r = self.stmts(&b.stmts);
        self.scopes().pop();
        r
    }

    fn stmts(&mut self, stmts: &[syn::Stmt]) -> R<Value> {
        let mut last = Value::Unit;
        for s in stmts {
            last = Value::Unit;
            self.step(s)?;
            match s {
                syn::Stmt::Local(l) => self.local(l)?,
                syn::Stmt::Expr(e, semi) => {
                    let v = self.expr(e)?;
                    if semi.is_none() {
                        last = v;
                    }
                }
                syn::Stmt::Macro(m) => {
                    let v = self.mac(&m.mac)?;
                    if m.semi_token.is_none() {
                        last = v;
                    }
                }
                syn::Stmt::Item(it) => {
                    return Err(self
                        .unsupported(it, "items inside functions are not supported: declare them at the top level")
                        .into())
                }
            }
        }
        Ok(last)
    }

    fn local(&mut self, l: &syn::Local) -> R<()> {
        let Some(init) = &l.init else {
            return Err(self.unsupported(l, "`let` needs a value: `let x = ...;`").into());
        };
        if init.diverge.is_some() {
            return Err(self.unsupported(l, "`let ... else` is not supported").into());
        }
        let v = self.expr(&init.expr)?;
        self.bind(&l.pat, v)
    }

    /// Binds a pattern (`x`, `mut x`, `_`, `(a, b)`, `x: f64`) to a value in the current scope.
    fn bind(&mut self, pat: &syn::Pat, v: Value) -> R<()> {
        match pat {
            syn::Pat::Ident(p) if p.subpat.is_none() => {
                self.define(p.ident.to_string(), v, p.mutability.is_some());
                Ok(())
            }
            syn::Pat::Wild(_) => Ok(()),
            syn::Pat::Paren(p) => self.bind(&p.pat, v),
            syn::Pat::Reference(r) => self.bind(&r.pat, v),
            syn::Pat::Type(t) => {
                let ty = Ty::from_syn(&t.ty)
                    .map_err(|(s, m)| Error::new(DiagKind::Unsupported, Span::of(self.file(), s), m))?;
                let v = ty.check(v).map_err(|m| Error::new(DiagKind::WrongType, self.sp(t), m))?;
                self.bind(&t.pat, v)
            }
            syn::Pat::Tuple(t) => match v {
                Value::Tuple(items) if items.len() == t.elems.len() => {
                    for (p, x) in t.elems.iter().zip(items.iter()) {
                        self.bind(p, x.clone())?;
                    }
                    Ok(())
                }
                other => Err(Error::new(
                    DiagKind::WrongType,
                    self.sp(t),
                    format!("expected a tuple of {} values, found {}", t.elems.len(), other.describe()),
                )
                .into()),
            },
            _ => Err(self.unsupported(pat, "this pattern is not supported (use a name, `_`, or a tuple)").into()),
        }
    }

    // ---- expressions -------------------------------------------------------------------------------------------

    /// Counts one step of evaluation at `at` (which is only asked for its span when the limit is reached).
    fn step<T: Spanned>(&mut self, at: &T) -> Result<(), Error> {
        self.budget.steps += 1;
        if self.budget.steps > MAX_STEPS {
            return self.budget.steps(0, self.sp(at));
        }
        Ok(())
    }

    pub fn expr(&mut self, e: &syn::Expr) -> R<Value> {
        self.step(e)?;
        if self.depth >= MAX_EVAL_DEPTH {
            return Err(limits::limit(
                self.sp(e),
                format!("evaluation nests deeper than {MAX_EVAL_DEPTH} levels (expressions within calls)"),
                "the evaluation depth limit was reached here",
                "MAX_EVAL_DEPTH",
            )
            .into());
        }
        self.depth += 1;
        let r = self.expr_inner(e);
        self.depth -= 1;
        r
    }

    /// Counts `copies` new aggregates of `items` at `span`: their slots (shared parts counted each time they appear,
    /// as a traversal visits them), and how deeply they nest.
    fn new_aggregate(&mut self, items: &[Value], copies: usize, span: Span) -> Result<(), Error> {
        limits::check_list_len(items.len().max(copies) as u128, span)?;
        let (depth, slots) = items
            .iter()
            .map(measure)
            .fold((0, items.len() as u64), |(d, n), m| (d.max(m.depth), n.saturating_add(m.slots)));
        self.budget.steps(slots, span)?;
        self.budget.bytes(slots.saturating_mul(copies as u64).saturating_mul(limits::SLOT_BYTES), span)?;
        check_value_depth(depth + 1, span)
    }

    fn expr_inner(&mut self, e: &syn::Expr) -> R<Value> {
        use syn::Expr as E;
        match e {
            E::Lit(l) => self.lit(&l.lit),
            E::Path(p) => self.path(p),
            E::Paren(p) => self.expr(&p.expr),
            E::Group(g) => self.expr(&g.expr),
            E::Reference(r) => self.expr(&r.expr),
            E::Call(c) => self.call(c),
            E::MethodCall(m) => self.method_call(m),
            E::Binary(b) => self.binary(b),
            E::Unary(u) => self.unary(u),
            E::Field(f) => self.field(f),
            E::Struct(s) => self.struct_lit(s),
            E::Macro(m) => self.mac(&m.mac),
            E::Array(a) => {
                let (vals, _) = self.args(&a.elems)?;
                self.new_aggregate(&vals, 1, self.sp(a))?;
                Ok(Value::list(vals))
            }
            E::Repeat(r) => {
                let v = self.expr(&r.expr)?;
                let n = self.length(&r.len)?;
                let span = self.sp(r);
                self.new_aggregate(std::slice::from_ref(&v), n, span)?;
                Ok(Value::list(vec![v; n]))
            }
            E::Tuple(t) if t.elems.is_empty() => Ok(Value::Unit),
            E::Tuple(t) => {
                let vals = self.args(&t.elems)?.0;
                self.new_aggregate(&vals, 1, self.sp(t))?;
                Ok(Value::Tuple(Rc::new(vals)))
            }
            E::Index(i) => self.index(i),
            E::Range(r) => self.range(r),
            E::Cast(c) => self.cast(c),
            E::Block(b) if b.label.is_none() => self.block(&b.block),
            E::If(i) => self.if_expr(i),
            E::ForLoop(f) if f.label.is_none() => self.for_loop(f),
            E::While(w) if w.label.is_none() => self.while_loop(w),
            E::Loop(l) if l.label.is_none() => self.loop_expr(l),
            E::Break(b) if b.label.is_none() => {
                let v = match &b.expr {
                    Some(x) => self.expr(x)?,
                    None => Value::Unit,
                };
                Err(Ctrl::Break(v))
            }
            E::Continue(c) if c.label.is_none() => Err(Ctrl::Continue),
            E::Return(r) => {
                let v = match &r.expr {
                    Some(x) => self.expr(x)?,
                    None => Value::Unit,
                };
                Err(Ctrl::Return(v))
            }
            E::Assign(a) => {
                let v = self.expr(&a.right)?;
                self.assign(&a.left, v)?;
                Ok(Value::Unit)
            }
            E::Closure(_) => Err(self.unsupported(e, "closures are not supported in recipes; write a `fn`").into()),
            E::Match(_) => Err(self.unsupported(e, "`match` is not supported in recipes; use `if`/`else`").into()),
            _ => Err(self.unsupported(e, "this expression is not supported in recipes").into()),
        }
    }

    fn unsupported<T: Spanned>(&self, t: &T, msg: &str) -> Error {
        Error::new(DiagKind::Unsupported, self.sp(t), msg).label("not supported")
    }

    fn lit(&mut self, l: &syn::Lit) -> R<Value> {
        let span = self.sp(l);
        let bad = |m: String| Error::new(DiagKind::Syntax, span, m);
        Ok(match l {
            syn::Lit::Int(i) if matches!(i.suffix(), "f64" | "f32") => {
                Value::Float(i.base10_parse::<f64>().map_err(|e| bad(e.to_string()))?)
            }
            syn::Lit::Int(i) => Value::Int(i.base10_parse::<i64>().map_err(|e| bad(e.to_string()))?),
            syn::Lit::Float(f) => Value::Float(f.base10_parse::<f64>().map_err(|e| bad(e.to_string()))?),
            syn::Lit::Bool(b) => Value::Bool(b.value),
            syn::Lit::Str(s) => Value::Str(Str { text: Rc::from(s.value()), origin: Some(span) }),
            _ => {
                return Err(self
                    .unsupported(l, "this literal is not supported (numbers, bools and strings are)")
                    .into())
            }
        })
    }

    fn path(&mut self, p: &syn::ExprPath) -> R<Value> {
        let span = self.sp(p);
        let Some(id) = p.path.get_ident() else {
            return Err(self.unsupported(p, "qualified paths are not supported as values").into());
        };
        let name = id.to_string();
        if let Some(b) = self.lookup(&name) {
            return Ok(b.value.clone());
        }
        if let Some(v) = self.constant(&name)? {
            return Ok(v);
        }
        if self.prog.fns.contains_key(&name) {
            return Ok(Value::Fn(Rc::from(name.as_str())));
        }
        if name == "ALL_LINEAR" {
            return Ok(Value::Targets(Rc::new(Targets::all_linear(Some(span)))));
        }
        let mut candidates = self.local_names();
        candidates.extend(self.prog.consts.keys().cloned());
        candidates.push("ALL_LINEAR".into());
        Err(Error::new(DiagKind::UnknownName, span, format!("cannot find value `{name}` in this scope"))
            .label("not found")
            .maybe_help(did_you_mean(&name, candidates.iter().map(String::as_str)))
            .into())
    }

    /// A `const` item, evaluated once in its own file.
    fn constant(&mut self, name: &str) -> R<Option<Value>> {
        if let Some(v) = self.consts.get(name) {
            return Ok(Some(v.clone()));
        }
        let prog = self.prog;
        let Some(def) = prog.consts.get(name) else { return Ok(None) };
        self.frames.push(Frame { file: def.file, scopes: vec![vec![]], call: None });
        let v = self.expr(def.expr);
        self.frames.pop();
        let span = Span::of(def.file, def.expr.span());
        let v = def.ty.check(v?).map_err(|m| Error::new(DiagKind::WrongType, span, m))?;
        self.consts.insert(name.to_string(), v.clone());
        Ok(Some(v))
    }

    /// The length of a list to build: a non-negative integer up to [`limits::MAX_LIST_LEN`].
    fn length(&mut self, e: &syn::Expr) -> R<usize> {
        let span = self.sp(e);
        match self.expr(e)? {
            Value::Int(i) if i >= 0 => {
                limits::check_list_len(i as u128, span)?;
                Ok(i as usize)
            }
            Value::Int(i) => Err(Error::new(DiagKind::InvalidValue, span, format!("a list of {i} elements")).into()),
            v => {
                Err(Error::new(DiagKind::WrongType, span, format!("expected a length, found {}", v.describe())).into())
            }
        }
    }

    fn binary(&mut self, b: &syn::ExprBinary) -> R<Value> {
        let span = self.sp(b);
        if let syn::BinOp::And(_) | syn::BinOp::Or(_) = b.op {
            let is_and = matches!(b.op, syn::BinOp::And(_));
            let l = self.bool_of(&b.left)?;
            if l != is_and {
                return Ok(Value::Bool(l));
            }
            return Ok(Value::Bool(self.bool_of(&b.right)?));
        }
        let Some((op, assign)) = BinOp::from_syn(&b.op) else {
            return Err(self.unsupported(b, "this operator is not supported").into());
        };
        let l = self.expr(&b.left)?;
        let r = self.expr(&b.right)?;
        let v = self.apply(op, l, r, span)?;
        if assign {
            self.assign(&b.left, v)?;
            return Ok(Value::Unit);
        }
        Ok(v)
    }

    /// `l op r`: tensors build graph nodes, everything else is computed now.
    pub fn apply(&mut self, op: BinOp, l: Value, r: Value, span: Span) -> Result<Value, Error> {
        if matches!(l, Value::Tensor(_)) || matches!(r, Value::Tensor(_)) {
            return tensor::binary(self, op, &l, &r, span);
        }
        match (&l, &r) {
            (Value::Str(a), Value::Str(b)) if op == BinOp::Add => {
                self.budget.string(a.text.len().saturating_add(b.text.len()), span)?;
            }
            // Comparing aggregates visits their elements.
            _ if matches!(op, BinOp::Eq | BinOp::Ne) => self.budget.steps(measure(&l).slots, span)?,
            _ => {}
        }
        ops::binary(op, &l, &r).map_err(|(kind, m)| Error::new(kind, span, m))
    }

    fn bool_of(&mut self, e: &syn::Expr) -> R<bool> {
        let span = self.sp(e);
        let v = self.expr(e)?;
        v.as_bool().ok_or_else(|| {
            Error::new(DiagKind::WrongType, span, format!("expected `bool`, found {}", v.describe())).into()
        })
    }

    fn unary(&mut self, u: &syn::ExprUnary) -> R<Value> {
        let span = self.sp(u);
        let v = self.expr(&u.expr)?;
        match (&u.op, v) {
            (syn::UnOp::Deref(_), v) => Ok(v),
            (syn::UnOp::Not(_), Value::Bool(b)) => Ok(Value::Bool(!b)),
            (syn::UnOp::Neg(_), Value::Int(i)) => match i.checked_neg() {
                Some(n) => Ok(Value::Int(n)),
                None => {
                    Err(Error::new(DiagKind::Eval, span, format!("attempt to negate `{i}`, which overflows")).into())
                }
            },
            (syn::UnOp::Neg(_), Value::Float(x)) => Ok(Value::Float(-x)),
            (syn::UnOp::Neg(_), Value::Tensor(t)) => Ok(tensor::neg(self, t, span)?),
            (_, v) => {
                Err(Error::new(DiagKind::WrongType, span, format!("cannot apply this operator to {}", v.describe()))
                    .into())
            }
        }
    }

    fn field(&mut self, f: &syn::ExprField) -> R<Value> {
        let base = self.expr(&f.base)?;
        let span = self.sp(&f.member);
        match (&f.member, &base) {
            (syn::Member::Named(id), Value::Struct(s)) => {
                let name = id.to_string();
                let Some(field) = s.field(&name) else {
                    return Err(Error::new(
                        DiagKind::UnknownField,
                        span,
                        format!("no field `{name}` on type `{}`", s.name),
                    )
                    .label("unknown field")
                    .maybe_help(did_you_mean(&name, s.field_names()))
                    .into());
                };
                if let (Some(blame), Some(origin)) = (&mut self.blame, field.origin) {
                    let mut shown = String::new();
                    field.value.display(&mut shown, None);
                    blame.push((origin, format!("{name} = {shown}")));
                }
                Ok(field.value.clone())
            }
            (syn::Member::Unnamed(i), Value::Tuple(items)) => items.get(i.index as usize).cloned().ok_or_else(|| {
                Error::new(DiagKind::UnknownField, span, format!("this tuple has {} elements", items.len())).into()
            }),
            (_, v) => Err(Error::new(DiagKind::UnknownField, span, format!("{} has no fields", v.describe()))
                .label("no such field")
                .into()),
        }
    }

    fn struct_lit(&mut self, s: &syn::ExprStruct) -> R<Value> {
        let pspan = self.sp(&s.path);
        let Some(name) = s.path.segments.last().map(|seg| seg.ident.to_string()) else {
            return Err(self.unsupported(s, "expected a struct name").into());
        };
        let prog = self.prog;
        let Some(def) = prog.structs.get(&name) else {
            return Err(Error::new(DiagKind::UnknownStruct, pspan, format!("cannot find struct `{name}`"))
                .label("not a struct of this file, the library or the prelude")
                .maybe_help(did_you_mean(&name, prog.structs.keys().map(String::as_str)))
                .into());
        };
        let mut fields: Vec<Option<Field>> = vec![None; def.fields.len()];
        for fv in &s.fields {
            let fspan = self.sp(&fv.member);
            let syn::Member::Named(id) = &fv.member else {
                return Err(self.unsupported(&fv.member, "fields are named: `S { x: 1 }`").into());
            };
            let fname = id.to_string();
            let Some(idx) = def.fields.iter().position(|f| f.name == fname) else {
                let names = def.fields.iter().map(|f| f.name.as_str());
                return Err(Error::new(
                    DiagKind::UnknownField,
                    fspan,
                    format!("struct `{name}` has no field named `{fname}`"),
                )
                .label("unknown field")
                .help(did_you_mean(&fname, names).unwrap_or_else(|| {
                    let all: Vec<String> = def.fields.iter().map(|f| format!("`{}`", f.name)).collect();
                    format!("`{name}` has the fields {}", all.join(", "))
                }))
                .into());
            };
            if fields[idx].is_some() {
                return Err(Error::new(
                    DiagKind::Duplicate,
                    fspan,
                    format!("field `{fname}` specified more than once"),
                )
                .label("used again here")
                .into());
            }
            let vspan = self.sp(&fv.expr);
            let v = self.expr(&fv.expr)?;
            let fdef = &def.fields[idx];
            let v = fdef.ty.check(v).map_err(|m| {
                Error::new(
                    DiagKind::WrongType,
                    vspan,
                    format!("wrong argument type for field `{fname}` of `{name}`: {m}"),
                )
                .label(format!("expected `{}`", fdef.ty))
            })?;
            let v = self.with_origin(v, vspan);
            fields[idx] = Some(Field { name: fname, value: v, origin: Some(vspan) });
        }
        if let Some(rest) = &s.rest {
            let rspan = self.sp(rest);
            match self.expr(rest)? {
                Value::Struct(base) if base.name == name => {
                    for (slot, fdef) in fields.iter_mut().zip(&def.fields) {
                        if slot.is_none() {
                            *slot = base.field(&fdef.name).cloned();
                        }
                    }
                }
                v => {
                    let msg = format!("expected a `{name}` after `..`, found {}", v.describe());
                    return Err(Error::new(DiagKind::WrongType, rspan, msg).into());
                }
            }
        }
        let mut missing = Vec::new();
        let mut out = Vec::with_capacity(fields.len());
        for (slot, fdef) in fields.into_iter().zip(&def.fields) {
            match (slot, &fdef.default) {
                (Some(f), _) => out.push(f),
                (None, Some(d)) => out.push(Field { name: fdef.name.clone(), value: d.clone(), origin: None }),
                (None, None) => missing.push(format!("`{}`", fdef.name)),
            }
        }
        if !missing.is_empty() {
            let plural = if missing.len() == 1 { "" } else { "s" };
            return Err(Error::new(
                DiagKind::MissingField,
                pspan,
                format!("missing field{plural} {} in `{name}`", missing.join(", ")),
            )
            .label(format!("missing field{plural}"))
            .into());
        }
        let values: Vec<Value> = out.iter().map(|f| f.value.clone()).collect();
        self.new_aggregate(&values, 1, pspan)?;
        Ok(Value::Struct(Rc::new(StructVal { name, fields: out })))
    }

    /// Gives a target list written in a struct literal the literal's span (for "matches nothing" errors).
    fn with_origin(&self, v: Value, span: Span) -> Value {
        match v {
            Value::Targets(t) if t.span.is_none() => {
                let mut t = Rc::unwrap_or_clone(t);
                t.span = Some(span);
                Value::Targets(Rc::new(t))
            }
            v => v,
        }
    }

    fn index(&mut self, i: &syn::ExprIndex) -> R<Value> {
        let span = self.sp(i);
        let base = self.expr(&i.expr)?;
        let idx = self.expr(&i.index)?;
        match (&base, idx) {
            (Value::List(items), Value::Int(k)) => match usize::try_from(k).ok().and_then(|k| items.get(k)) {
                Some(v) => Ok(v.clone()),
                None => Err(Error::new(
                    DiagKind::Eval,
                    span,
                    format!("index out of bounds: the len is {} but the index is {k}", items.len()),
                )
                .into()),
            },
            (Value::List(items), Value::Range(a, b)) => {
                if a < 0 || b < a || b as usize > items.len() {
                    let msg = format!("range {a}..{b} out of bounds for a list of {}", items.len());
                    return Err(Error::new(DiagKind::Eval, span, msg).into());
                }
                self.budget.list((b - a) as usize, span)?;
                Ok(Value::list(items[a as usize..b as usize].to_vec()))
            }
            (b, k) => Err(Error::new(
                DiagKind::WrongType,
                span,
                format!("cannot index {} with {}", b.describe(), k.describe()),
            )
            .into()),
        }
    }

    fn range(&mut self, r: &syn::ExprRange) -> R<Value> {
        let (Some(a), Some(b)) = (&r.start, &r.end) else {
            return Err(self.unsupported(r, "ranges need both ends: `0..n`").into());
        };
        let (sa, sb) = (self.sp(a), self.sp(b));
        let int = |v: Value, s: Span| match v {
            Value::Int(i) => Ok(i),
            v => Err(Error::new(DiagKind::WrongType, s, format!("expected an integer, found {}", v.describe()))),
        };
        let a = int(self.expr(a)?, sa)?;
        let b = int(self.expr(b)?, sb)?;
        if !matches!(r.limits, syn::RangeLimits::Closed(_)) {
            return Ok(Value::Range(a, b));
        }
        match b.checked_add(1) {
            Some(end) => Ok(Value::Range(a, end)),
            None => Err(Error::new(DiagKind::Eval, sb, "the end of this range overflows").into()),
        }
    }

    fn cast(&mut self, c: &syn::ExprCast) -> R<Value> {
        let span = self.sp(c);
        let v = self.expr(&c.expr)?;
        let ty =
            Ty::from_syn(&c.ty).map_err(|(s, m)| Error::new(DiagKind::Unsupported, Span::of(self.file(), s), m))?;
        let out = match (&ty, &v) {
            (Ty::Float { .. }, Value::Int(i)) => Value::Float(*i as f64),
            (Ty::Float { .. }, Value::Float(x)) => Value::Float(*x),
            (Ty::Int { unsigned, .. }, Value::Float(x)) => {
                Value::Int(if *unsigned { x.max(0.0) as i64 } else { *x as i64 })
            }
            (Ty::Int { unsigned, name }, Value::Int(i)) => {
                if *unsigned && *i < 0 {
                    return Err(Error::new(DiagKind::Eval, span, format!("{i} does not fit in `{name}`")).into());
                }
                Value::Int(*i)
            }
            (Ty::Int { .. }, Value::Bool(b)) => Value::Int(i64::from(*b)),
            _ => {
                let msg = format!("cannot cast {} as `{ty}`", v.describe());
                return Err(Error::new(DiagKind::WrongType, span, msg).into());
            }
        };
        Ok(out)
    }

    fn if_expr(&mut self, i: &syn::ExprIf) -> R<Value> {
        if let syn::Expr::Let(_) = &*i.cond {
            return Err(self.unsupported(&i.cond, "`if let` is not supported").into());
        }
        if self.bool_of(&i.cond)? {
            self.block(&i.then_branch)
        } else if let Some((_, e)) = &i.else_branch {
            self.expr(e)
        } else {
            Ok(Value::Unit)
        }
    }

    fn for_loop(&mut self, f: &syn::ExprForLoop) -> R<Value> {
        let span = self.sp(&f.expr);
        let items: Box<dyn Iterator<Item = Value>> = match self.expr(&f.expr)? {
            Value::Range(a, b) => Box::new((a..b).map(Value::Int)),
            Value::List(items) => Box::new(Rc::unwrap_or_clone(items).into_iter()),
            v => {
                let msg = format!("cannot iterate over {}", v.describe());
                return Err(Error::new(DiagKind::WrongType, span, msg).into());
            }
        };
        for v in items {
            self.step(f)?;
            self.scopes().push(vec![]);
            let r = self.bind(&f.pat, v).and_then(|_| self.block(&f.body));
            self.scopes().pop();
            match r {
                Ok(_) | Err(Ctrl::Continue) => {}
                Err(Ctrl::Break(_)) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Value::Unit)
    }

    fn while_loop(&mut self, w: &syn::ExprWhile) -> R<Value> {
        while self.bool_of(&w.cond)? {
            self.step(w)?;
            match self.block(&w.body) {
                Ok(_) | Err(Ctrl::Continue) => {}
                Err(Ctrl::Break(_)) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Value::Unit)
    }

    fn loop_expr(&mut self, l: &syn::ExprLoop) -> R<Value> {
        loop {
            self.step(l)?;
            match self.block(&l.body) {
                Ok(_) | Err(Ctrl::Continue) => {}
                Err(Ctrl::Break(v)) => return Ok(v),
                Err(e) => return Err(e),
            }
        }
    }

    // ---- assignment ----------------------------------------------------------------------------------------------

    /// Resolves an assignable expression to its variable and the fields/indices below it.
    fn place(&mut self, e: &syn::Expr) -> R<(String, Vec<Step>)> {
        match e {
            syn::Expr::Path(p) if p.path.get_ident().is_some() => {
                Ok((p.path.get_ident().map(|i| i.to_string()).unwrap_or_default(), vec![]))
            }
            syn::Expr::Paren(p) => self.place(&p.expr),
            syn::Expr::Unary(syn::ExprUnary { op: syn::UnOp::Deref(_), expr, .. }) => self.place(expr),
            syn::Expr::Field(f) => {
                let (root, mut steps) = self.place(&f.base)?;
                match &f.member {
                    syn::Member::Named(id) => steps.push(Step::Field(id.to_string(), self.sp(&f.member))),
                    syn::Member::Unnamed(i) => steps.push(Step::Index(i.index as i64, self.sp(&f.member))),
                }
                Ok((root, steps))
            }
            syn::Expr::Index(i) => {
                let (root, mut steps) = self.place(&i.expr)?;
                let span = self.sp(&i.index);
                match self.expr(&i.index)? {
                    Value::Int(k) => steps.push(Step::Index(k, span)),
                    v => {
                        return Err(Error::new(
                            DiagKind::WrongType,
                            span,
                            format!("cannot index with {}", v.describe()),
                        )
                        .into())
                    }
                }
                Ok((root, steps))
            }
            _ => Err(self.unsupported(e, "cannot assign to this expression").into()),
        }
    }

    fn place_mut(&mut self, root: &str, steps: &[Step], span: Span) -> Result<&mut Value, Error> {
        let prog = self.prog;
        let budget = &mut self.budget;
        let binding = self
            .frames
            .last_mut()
            .and_then(|f| f.scopes.iter_mut().rev().flat_map(|s| s.iter_mut().rev()).find(|b| b.name == root));
        let Some(b) = binding else {
            return Err(Error::new(DiagKind::UnknownName, span, format!("cannot find value `{root}` in this scope")));
        };
        if !b.mutable {
            return Err(Error::new(
                DiagKind::Eval,
                span,
                format!("cannot assign to `{root}`, as it is not declared `mut`"),
            )
            .help(format!("declare it with `let mut {root}`")));
        }
        let mut cur = &mut b.value;
        for step in steps {
            cur = match (step, cur) {
                (Step::Field(name, s), Value::Struct(st)) => {
                    let st = Rc::make_mut(st);
                    let sname = st.name.clone();
                    let known: Vec<String> = st.fields.iter().map(|f| f.name.clone()).collect();
                    match st.fields.iter_mut().find(|f| &f.name == name) {
                        Some(f) => {
                            f.origin = None;
                            if prog.structs.get(&sname).and_then(|d| d.field(name)).is_none() {
                                return Err(Error::new(
                                    DiagKind::UnknownField,
                                    *s,
                                    format!("no field `{name}` on `{sname}`"),
                                ));
                            }
                            &mut f.value
                        }
                        None => {
                            return Err(Error::new(
                                DiagKind::UnknownField,
                                *s,
                                format!("no field `{name}` on type `{sname}`"),
                            )
                            .maybe_help(did_you_mean(name, known.iter().map(String::as_str))))
                        }
                    }
                }
                (Step::Index(k, s), Value::List(items) | Value::Tuple(items)) => {
                    if Rc::strong_count(items) > 1 {
                        // Copy on write: the list is copied.
                        budget.list(items.len(), *s)?;
                    }
                    let items = Rc::make_mut(items);
                    let len = items.len();
                    match usize::try_from(*k).ok().and_then(|k| items.get_mut(k)) {
                        Some(v) => v,
                        None => {
                            let msg = format!("index out of bounds: the len is {len} but the index is {k}");
                            return Err(Error::new(DiagKind::Eval, *s, msg));
                        }
                    }
                }
                (Step::Field(_, s) | Step::Index(_, s), v) => {
                    return Err(Error::new(
                        DiagKind::WrongType,
                        *s,
                        format!("{} has no such field or element", v.describe()),
                    ))
                }
            };
        }
        Ok(cur)
    }

    fn assign(&mut self, target: &syn::Expr, v: Value) -> R<()> {
        let span = self.sp(target);
        let (root, steps) = self.place(target)?;
        // A struct field keeps its declared type.
        let v = match steps.last() {
            Some(Step::Field(name, _)) => {
                let owner = {
                    let parent = self.place_mut(&root, &steps[..steps.len() - 1], span)?;
                    match parent {
                        Value::Struct(s) => Some(s.name.clone()),
                        _ => None,
                    }
                };
                match owner.and_then(|o| self.prog.structs.get(&o)).and_then(|d| d.field(name)) {
                    Some(f) => f.ty.check(v).map_err(|m| Error::new(DiagKind::WrongType, span, m))?,
                    None => v,
                }
            }
            _ => v,
        };
        if !steps.is_empty() {
            let m = measure(&v);
            self.budget.steps(m.slots, span)?;
            self.budget.bytes(m.slots.saturating_mul(limits::SLOT_BYTES), span)?;
            check_value_depth(steps.len() + m.depth, span)?;
        }
        let slot = self.place_mut(&root, &steps, span)?;
        *slot = v;
        Ok(())
    }

    // ---- macros --------------------------------------------------------------------------------------------------

    fn mac(&mut self, m: &syn::Macro) -> R<Value> {
        let span = self.sp(m);
        let name = m.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
        let syntax =
            |me: &Self, e: syn::Error| Error::new(DiagKind::Syntax, Span::of(me.file(), e.span()), e.to_string());
        match name.as_str() {
            "vec" => {
                let body = m.parse_body_with(parse_vec).map_err(|e| syntax(self, e))?;
                match body {
                    VecBody::List(items) => {
                        let mut vals = Vec::with_capacity(items.len());
                        for e in &items {
                            vals.push(self.expr(e)?);
                        }
                        self.new_aggregate(&vals, 1, span)?;
                        Ok(Value::list(vals))
                    }
                    VecBody::Repeat(x, n) => {
                        let v = self.expr(&x)?;
                        let n = self.length(&n)?;
                        self.new_aggregate(std::slice::from_ref(&v), n, span)?;
                        Ok(Value::list(vec![v; n]))
                    }
                }
            }
            "format" => {
                let args = m.parse_body_with(Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated);
                let args: Vec<syn::Expr> = args.map_err(|e| syntax(self, e))?.into_iter().collect();
                let s = self.format(&args, span)?;
                self.budget.string(s.len(), span)?;
                Ok(Value::Str(Str { text: Rc::from(s), origin: None }))
            }
            "assert" | "assert_eq" | "assert_ne" => {
                let args = m.parse_body_with(Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated);
                let args: Vec<syn::Expr> = args.map_err(|e| syntax(self, e))?.into_iter().collect();
                self.assert(&name, &args, span)?;
                Ok(Value::Unit)
            }
            "panic" => {
                let args = m.parse_body_with(Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated);
                let args: Vec<syn::Expr> = args.map_err(|e| syntax(self, e))?.into_iter().collect();
                let msg = if args.is_empty() { "explicit panic".to_string() } else { self.format(&args, span)? };
                Err(Error::new(DiagKind::Assertion, span, msg).into())
            }
            _ => Err(Error::new(DiagKind::UnknownFunction, self.sp(&m.path), format!("cannot find macro `{name}!`"))
                .label("not supported")
                .help("recipes support vec!, format!, assert!, assert_eq!, assert_ne! and panic!")
                .into()),
        }
    }

    /// `assert!(cond, "fmt", args..)`: a failure points at the struct fields the condition read, where they were
    /// written (so a library's config check points into the user's recipe).
    fn assert(&mut self, which: &str, args: &[syn::Expr], span: Span) -> R<()> {
        let n = if which == "assert" { 1 } else { 2 };
        if args.len() < n {
            let msg = format!("`{which}!` needs {n} argument{}", if n == 1 { "" } else { "s" });
            return Err(Error::new(DiagKind::WrongArgCount, span, msg).into());
        }
        let outer = self.blame.replace(Vec::new());
        let held = self.assert_holds(which, &args[..n]);
        let blame = std::mem::replace(&mut self.blame, outer).unwrap_or_default();
        let (ok, detail) = held?;
        if ok {
            return Ok(());
        }
        let cond = self.sp(&args[0]).to(self.sp(&args[n - 1]));
        let message = if args.len() > n {
            self.format(&args[n..], span)?
        } else {
            let cond: Vec<&str> = args[..n].iter().map(|a| self.sources.text(self.sp(a))).collect();
            match which {
                "assert" => format!("assertion failed: {}", cond[0]),
                _ => format!(
                    "assertion `{}` failed{detail}",
                    cond.join(if which == "assert_eq" { " == " } else { " != " })
                ),
            }
        };
        Err(Error::new(DiagKind::Assertion, cond, message).label("this check failed").blame(blame).into())
    }

    fn assert_holds(&mut self, which: &str, args: &[syn::Expr]) -> R<(bool, String)> {
        if which == "assert" {
            return Ok((self.bool_of(&args[0])?, String::new()));
        }
        let l = self.expr(&args[0])?;
        let r = self.expr(&args[1])?;
        let (mut ls, mut rs) = (String::new(), String::new());
        l.debug(&mut ls);
        r.debug(&mut rs);
        let eq = ops::equal(&l, &r);
        Ok((eq == (which == "assert_eq"), format!(": left = {ls}, right = {rs}")))
    }

    /// Evaluates `format!`-style arguments: a string literal, then positional and `name = value` arguments.
    fn format(&mut self, args: &[syn::Expr], span: Span) -> R<String> {
        let Some(syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(lit), .. })) = args.first() else {
            let at = args.first().map_or(span, |a| self.sp(a));
            return Err(Error::new(DiagKind::Syntax, at, "format argument must be a string literal").into());
        };
        let fspan = self.sp(lit);
        let pieces = format::parse(&lit.value()).map_err(|m| Error::new(DiagKind::Syntax, fspan, m))?;
        let mut positional: Vec<(Value, Span)> = Vec::new();
        let mut named: Vec<(String, Value)> = Vec::new();
        for a in &args[1..] {
            match a {
                syn::Expr::Assign(asg) => {
                    let syn::Expr::Path(p) = &*asg.left else {
                        return Err(self.unsupported(a, "named arguments look like `name = value`").into());
                    };
                    let name = p.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
                    let v = self.expr(&asg.right)?;
                    named.push((name, v));
                }
                _ => {
                    let s = self.sp(a);
                    positional.push((self.expr(a)?, s));
                }
            }
        }
        let mut used = vec![false; positional.len()];
        let mut next = 0;
        let mut out = String::new();
        for p in pieces {
            let (arg, debug, precision) = match p {
                Piece::Lit(s) => {
                    out.push_str(&s);
                    continue;
                }
                Piece::Arg { arg, debug, precision } => (arg, debug, precision),
            };
            let v = match arg {
                ArgRef::Next | ArgRef::Index(_) => {
                    let i = if let ArgRef::Index(i) = arg {
                        i
                    } else {
                        next += 1;
                        next - 1
                    };
                    let Some((v, _)) = positional.get(i) else {
                        let msg = format!(
                            "format string refers to argument {i}, but there are {} arguments",
                            positional.len()
                        );
                        return Err(Error::new(DiagKind::WrongArgCount, fspan, msg).into());
                    };
                    used[i] = true;
                    v.clone()
                }
                ArgRef::Name(n) => match named.iter().find(|(k, _)| *k == n) {
                    Some((_, v)) => v.clone(),
                    None => match self.lookup(&n).map(|b| b.value.clone()) {
                        Some(v) => v,
                        None => match self.constant(&n)? {
                            Some(v) => v,
                            None => {
                                return Err(Error::new(
                                    DiagKind::UnknownName,
                                    fspan,
                                    format!("cannot find value `{n}` in this scope"),
                                )
                                .label("used in this format string")
                                .into())
                            }
                        },
                    },
                },
            };
            if debug {
                v.debug(&mut out);
            } else {
                v.display(&mut out, precision);
            }
            self.budget.steps(out.len() as u64 / 64, fspan)?;
            limits::check_string_len(out.len() as u128, span)?;
        }
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(Error::new(DiagKind::WrongArgCount, positional[i].1, "argument never used")
                .label("not used by the format string")
                .into());
        }
        Ok(out)
    }
}

/// A value seen as a tree: how deeply it nests (0 for a plain value, 1 for a list of plain values, ...) and how
/// many slots it has when shared parts count each time they appear (what printing, comparing or type-checking it
/// visits).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measure {
    pub depth: usize,
    pub slots: u64,
}

/// Measures `v`, looking at each shared aggregate once (so `vec![vec![x; n]; n]` costs n + n, not n²). Values
/// never nest deeper than [`MAX_VALUE_DEPTH`], so the recursion is bounded.
pub fn measure(v: &Value) -> Measure {
    fn go(v: &Value, memo: &mut HashMap<usize, Measure>) -> Measure {
        let (key, items): (usize, Box<dyn Iterator<Item = &Value>>) = match v {
            Value::List(items) | Value::Tuple(items) => (Rc::as_ptr(items) as usize, Box::new(items.iter())),
            Value::Struct(s) => (Rc::as_ptr(s) as usize, Box::new(s.fields.iter().map(|f| &f.value))),
            _ => return Measure::default(),
        };
        if let Some(m) = memo.get(&key) {
            return *m;
        }
        let mut m = Measure { depth: 1, slots: 0 };
        for x in items {
            let e = go(x, memo);
            m.depth = m.depth.max(e.depth + 1);
            m.slots = m.slots.saturating_add(1).saturating_add(e.slots);
        }
        memo.insert(key, m);
        m
    }
    go(v, &mut HashMap::new())
}

/// An error if a value would nest deeper than [`MAX_VALUE_DEPTH`].
fn check_value_depth(depth: usize, span: Span) -> Result<(), Error> {
    if depth > MAX_VALUE_DEPTH {
        return Err(limits::limit(
            span,
            format!("this value would nest {depth} levels deep (lists, tuples or structs inside each other)"),
            "nests too deeply",
            "MAX_VALUE_DEPTH",
        ));
    }
    Ok(())
}

/// The body of `vec![..]`: a list or `x; n`.
enum VecBody {
    List(Vec<syn::Expr>),
    Repeat(Box<syn::Expr>, Box<syn::Expr>),
}

fn parse_vec(input: ParseStream) -> syn::Result<VecBody> {
    if input.is_empty() {
        return Ok(VecBody::List(vec![]));
    }
    let first: syn::Expr = input.parse()?;
    if input.peek(syn::Token![;]) {
        input.parse::<syn::Token![;]>()?;
        let n: syn::Expr = input.parse()?;
        return Ok(VecBody::Repeat(Box::new(first), Box::new(n)));
    }
    let mut items = vec![first];
    while !input.is_empty() {
        input.parse::<syn::Token![,]>()?;
        if input.is_empty() {
            break;
        }
        items.push(input.parse()?);
    }
    Ok(VecBody::List(items))
}

#[cfg(test)]
mod tests {
    use crate::diag::DiagKind;
    use crate::eval_debug;

    /// `{:?}` of `fn main()`'s value.
    fn run(src: &str) -> String {
        eval_debug(src, "main").unwrap_or_else(|d| panic!("{}", d.render()))
    }

    fn fails(src: &str) -> crate::Diagnostic {
        match eval_debug(src, "main") {
            Ok(v) => panic!("expected an error, got {v}"),
            Err(d) => d,
        }
    }

    #[test]
    fn format_macro() {
        let src = r#"
            fn main() -> String {
                let i = 3;
                let theta = 10000.0;
                format!("layers.{i}.{} {:?} {0} {x} {{}} {:.2} {:?} {:?}", "q", theta, 1.0 / 3.0, "s", [1, 2], x = true)
            }"#;
        assert_eq!(run(src), r#""layers.3.q 10000.0 q true {} 0.33 \"s\" [1, 2]""#);
    }

    #[test]
    fn format_errors() {
        assert_eq!(fails(r#"fn main() -> String { format!("{} {}", 1) }"#).kind, DiagKind::WrongArgCount);
        assert_eq!(fails(r#"fn main() -> String { format!("{}", 1, 2) }"#).kind, DiagKind::WrongArgCount);
        assert_eq!(fails(r#"fn main() -> String { format!("{nope}") }"#).kind, DiagKind::UnknownName);
        assert_eq!(fails(r#"fn main() -> String { format!("{") }"#).kind, DiagKind::Syntax);
    }

    #[test]
    fn loops_and_control_flow() {
        let src = r#"
            fn main() -> (i64, i64, Vec<i64>, i64) {
                let mut sum = 0;
                for i in 0..10 {
                    if i % 2 == 0 { continue; }
                    if i > 7 { break; }
                    sum += i;
                }
                let mut evens = vec![];
                for x in [1, 2, 3, 4] {
                    if x % 2 == 0 { evens.push(x * 10); }
                }
                let mut n = 0;
                while n < 5 { n = n + 1; }
                let mut total = 0;
                for (i, x) in vec![5, 6].iter().enumerate() { total += i * x; }
                (sum, n, evens, total + (0..=3).len())
            }"#;
        assert_eq!(run(src), "(16, 5, [20, 40], 10)");
    }

    #[test]
    fn if_else_is_an_expression_and_functions_recurse() {
        let src = r#"
            fn fact(n: u64) -> u64 { if n <= 1 { 1 } else { n * fact(n - 1) } }
            fn sign(x: f64) -> i64 { if x < 0.0 { -1 } else if x == 0.0 { 0 } else { return 1; } }
            fn main() -> Vec<i64> { vec![fact(10), sign(-2.0), sign(0.0), sign(3.0)] }"#;
        assert_eq!(run(src), "[3628800, -1, 0, 1]");
    }

    #[test]
    fn struct_update_syntax_and_defaults() {
        let src = r#"
            pub struct P { pub x: f64, pub y: f64, pub name: String }
            impl Default for P { fn default() -> P { P { x: 1.0, y: 2.0, name: "origin".to_string() } } }
            impl P { fn norm2(&self) -> f64 { self.x * self.x + self.y * self.y } }
            fn main() -> (P, f64, f64, usize, usize) {
                let p = P { x: 3, ..P::default() };
                let t = Train { seq_len: 8, ..Train::default() };
                let mut q = p.clone();
                q.y = 4;
                (p, q.norm2(), t.lr, t.seq_len, t.micro_batch)
            }"#;
        assert_eq!(run(src), r#"(P { x: 3.0, y: 2.0, name: "origin" }, 25.0, 0.0002, 8, 1)"#);
    }

    #[test]
    fn field_types_are_checked() {
        let base = "pub struct C { pub rate: f64, pub n: usize, pub tag: String }";
        // An integer where a float is declared is accepted (and widened).
        assert_eq!(
            run(&format!("{base} fn main() -> C {{ C {{ rate: 2, n: 3, tag: \"a\".into() }} }}")),
            r#"C { rate: 2.0, n: 3, tag: "a" }"#
        );
        let wrong = fails(&format!("{base} fn main() -> C {{ C {{ rate: \"2\", n: 3, tag: \"a\".into() }} }}"));
        assert_eq!(wrong.kind, DiagKind::WrongType);
        assert!(wrong.message.contains("expected `f64`, found a string"), "{}", wrong.message);
        assert_eq!(
            fails(&format!("{base} fn main() -> C {{ C {{ rate: 1.0, n: -3, tag: \"a\".into() }} }}")).kind,
            DiagKind::WrongType
        );
        assert_eq!(fails(&format!("{base} fn main() -> C {{ C {{ rate: 1.0, n: 3 }} }}")).kind, DiagKind::MissingField);
        assert_eq!(
            fails(&format!("{base} fn main() -> C {{ C {{ rate: 1.0, n: 3, tag: \"a\".into(), n: 4 }} }}")).kind,
            DiagKind::Duplicate
        );
        let arg = fails("fn f(x: bool) -> bool { x } fn main() -> bool { f(1) }");
        assert_eq!(arg.kind, DiagKind::WrongType);
        assert!(arg.message.starts_with("wrong argument type"), "{}", arg.message);
        assert_eq!(fails("fn f(x: bool) -> bool { x } fn main() -> bool { f() }").kind, DiagKind::WrongArgCount);
        assert_eq!(fails("fn main() -> usize { 1.5 }").kind, DiagKind::WrongType);
    }

    #[test]
    fn bindings_consts_and_methods() {
        let src = r#"
            const LAYERS: usize = 4;
            fn main() -> (usize, f64, bool, String, i64, f64) {
                let (a, b) = (LAYERS * 2, 64);
                let hd = (b as f64).sqrt();
                let xs = vec![0; 3];
                let s = String::from("model.layers");
                (a, hd, xs.contains(&0) && !xs.is_empty(), s.replace("layers", "norm"), 1e3 as i64, 2.0f64.powi(10))
            }"#;
        assert_eq!(run(src), r#"(8, 8.0, true, "model.norm", 1000, 1024.0)"#);
    }

    #[test]
    fn immutable_bindings_and_unknown_names() {
        assert_eq!(fails("fn main() -> i64 { let x = 1; x = 2; x }").kind, DiagKind::Eval);
        assert_eq!(fails("fn main() -> i64 { let x = 1; y }").kind, DiagKind::UnknownName);
        assert_eq!(fails("fn main() -> i64 { nope(1) }").kind, DiagKind::UnknownFunction);
        assert_eq!(fails("fn main() -> i64 { 1.nope() }").kind, DiagKind::UnknownMethod);
        assert_eq!(fails("fn main() -> i64 { 1 / 0 }").kind, DiagKind::Eval);
        assert_eq!(fails("fn main() -> i64 { vec![1][3] }").kind, DiagKind::Eval);
        assert_eq!(fails("fn main() -> i64 { let f = |x| x; 1 }").kind, DiagKind::Unsupported);
        assert_eq!(fails("fn main() -> i64 { main() }").kind, DiagKind::Limit);
    }

    #[test]
    fn assert_reports_its_message() {
        let d = fails(r#"fn main() { let n = 3; assert!(n % 2 == 0, "n = {} is odd", n); }"#);
        assert_eq!(d.kind, DiagKind::Assertion);
        assert_eq!(d.message, "n = 3 is odd");
        let d = fails("fn main() { assert_eq!(1 + 1, 3); }");
        assert_eq!(d.message, "assertion `1 + 1 == 3` failed: left = 2, right = 3");
        let d = fails("fn main() { assert!(1 > 2); }");
        assert_eq!(d.message, "assertion failed: 1 > 2");
        let d = fails(r#"fn main() { panic!("bad {}", 1); }"#);
        assert_eq!(d.message, "bad 1");
    }

    #[test]
    fn hostile_programs_give_diagnostics_not_panics() {
        let cases = [
            "fn main() -> i64 { -(-9223372036854775807 - 1) }",
            "fn main() -> i64 { (-9223372036854775807 - 1).abs() }",
            "fn main() -> Vec<i64> { vec![0; 1 << 40] }",
            "fn main() -> i64 { (0..9223372036854775807).len() + (0..=9223372036854775807).len() }",
            "fn main() -> Vec<i64> { (0..9223372036854775807).collect() }",
            "fn main() -> i64 { 1 << 64 }",
            "fn main() -> i64 { 9223372036854775808 }",
            "fn main() { param(\"w\", [2, 3]); }",
            "fn main() { label(\"x\"); }",
            "fn main() -> Tensor { linear(1, 2) }",
            "fn main() -> i64 { let x = vec![1]; x[18446744073709551615] }",
            "fn main() -> i64 { let mut x = vec![1]; x[5] = 2; 0 }",
            "fn main() -> i64 { let mut x = (1, 2); x.5 = 2; 0 }",
            "fn main() -> usize { -1 as usize }",
            "fn main() -> i64 { break; }",
            "fn main() -> i64 { assert!(1); 0 }",
            "fn main() -> String { format!(\"{:>5}\", 1) }",
            "fn main() -> f64 { 1.0.nope() }",
            "fn main() -> Recipe { Recipe::new(1) }",
            "fn main() -> Model { Model::new(\"x\", 1, main) }",
            "fn main() -> Train { Lora::default() }",
            "struct S { x: Nope } fn main() {}",
            "fn f<T>(x: T) {} fn main() {}",
            "enum E { A } fn main() {}",
        ];
        for src in cases {
            // A panic would come back as an `Internal` diagnostic ("the compiler crashed").
            match eval_debug(src, "main") {
                Ok(v) => panic!("{src} should fail, gave {v}"),
                Err(d) => assert_ne!(d.kind, DiagKind::Internal, "{src}: {}", d.message),
            }
        }
    }
}
