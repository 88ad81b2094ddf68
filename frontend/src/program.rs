//! The items of a compilation: `fn`s, `struct`s, `impl` blocks and `const`s collected from the library files and
//! the recipe file, with their declared types read and checked to exist.
//!
//! Name resolution is global: an item of the recipe file shadows a library item of the same name; two items of one
//! file may not share a name.

use crate::diag::{did_you_mean, DiagKind, Error, FileId, Span};
use crate::schema;
use crate::ty::{Ty, BUILTIN_TYPES};
use crate::value::Value;
use std::collections::HashMap;
use syn::spanned::Spanned;

/// A `fn` item (free, or in an `impl` block).
#[derive(Debug)]
pub struct FnDef<'a> {
    pub name: String,
    pub file: FileId,
    /// The name's span.
    pub span: Span,
    pub params: Vec<ParamDef<'a>>,
    /// Whether the function takes `self` (a method of an `impl` block).
    pub has_self: bool,
    pub ret: Ty,
    pub body: &'a syn::Block,
}

#[derive(Debug)]
pub struct ParamDef<'a> {
    pub pat: &'a syn::Pat,
    pub ty: Ty,
    pub span: Span,
}

/// A struct type: declared in a file (`pub struct LlamaConfig { .. }`) or built in (`Lora`, `Train`, ...).
#[derive(Clone, Debug)]
pub struct StructDef {
    pub name: String,
    pub fields: Vec<FieldDef>,
    /// Where it is declared (`None` for built-in structs).
    pub span: Option<Span>,
}

#[derive(Clone, Debug)]
pub struct FieldDef {
    pub name: String,
    pub ty: Ty,
    /// Built-in structs give most fields a default, so struct literals may leave them out.
    pub default: Option<Value>,
    pub doc: &'static str,
}

impl StructDef {
    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.name == name)
    }
}

#[derive(Debug)]
pub struct ConstDef<'a> {
    pub file: FileId,
    pub ty: Ty,
    pub expr: &'a syn::Expr,
}

/// Everything declared, by name.
#[derive(Debug, Default)]
pub struct Program<'a> {
    pub fns: HashMap<String, FnDef<'a>>,
    pub structs: HashMap<String, StructDef>,
    /// Functions of `impl` blocks by (type, name).
    pub methods: HashMap<(String, String), FnDef<'a>>,
    pub consts: HashMap<String, ConstDef<'a>>,
}

impl<'a> Program<'a> {
    /// Collects the items of `files` (libraries first, the recipe last so that it shadows them).
    pub fn load(files: &'a [(FileId, syn::File)]) -> Result<Program<'a>, Error> {
        let mut p = Program::default();
        for s in schema::BUILTIN_STRUCTS {
            if let Some(def) = schema::builtin_struct(s) {
                p.structs.insert(s.to_string(), def);
            }
        }
        for (file, ast) in files {
            let mut seen: HashMap<String, Span> = HashMap::new();
            let mut claim = |name: String, span: Span| -> Result<(), Error> {
                match seen.insert(name.clone(), span) {
                    Some(_) => {
                        Err(Error::new(DiagKind::Duplicate, span, format!("`{name}` is defined twice in this file"))
                            .label("second definition"))
                    }
                    None => Ok(()),
                }
            };
            for item in &ast.items {
                let span = Span::of(*file, item.span());
                match item {
                    syn::Item::Use(u) => check_use(*file, u)?,
                    syn::Item::Fn(f) => {
                        let def = fn_def(*file, &f.sig, &f.block)?;
                        claim(def.name.clone(), def.span)?;
                        if def.has_self {
                            return Err(Error::new(DiagKind::Unsupported, def.span, "free functions take no `self`"));
                        }
                        p.fns.insert(def.name.clone(), def);
                    }
                    syn::Item::Struct(s) => {
                        let name = s.ident.to_string();
                        let at = Span::of(*file, s.ident.span());
                        claim(name.clone(), at)?;
                        if schema::BUILTIN_STRUCTS.contains(&name.as_str()) || BUILTIN_TYPES.contains(&name.as_str()) {
                            return Err(Error::new(DiagKind::Duplicate, at, format!("`{name}` is a built-in type"))
                                .label("choose another name"));
                        }
                        p.structs.insert(name.clone(), struct_def(*file, s)?);
                    }
                    syn::Item::Impl(i) => {
                        let ty = impl_type(*file, i)?;
                        for it in &i.items {
                            let syn::ImplItem::Fn(f) = it else {
                                return Err(unsupported(*file, it.span(), "only `fn` items are supported in `impl`"));
                            };
                            let def = fn_def(*file, &f.sig, &f.block)?;
                            claim(format!("{ty}::{}", def.name), def.span)?;
                            p.methods.insert((ty.clone(), def.name.clone()), def);
                        }
                    }
                    syn::Item::Const(c) => {
                        let name = c.ident.to_string();
                        claim(name.clone(), Span::of(*file, c.ident.span()))?;
                        let ty = read_ty(*file, &c.ty)?;
                        p.consts.insert(name, ConstDef { file: *file, ty, expr: &c.expr });
                    }
                    _ => {
                        let msg = "recipes may contain `use`, `fn`, `struct`, `impl` and `const` items";
                        return Err(Error::new(DiagKind::Unsupported, span, msg).label("not supported"));
                    }
                }
            }
        }
        p.check_types(files)?;
        Ok(p)
    }

    /// Every type named in a declaration must exist.
    fn check_types(&self, files: &'a [(FileId, syn::File)]) -> Result<(), Error> {
        let known = |n: &str| self.structs.contains_key(n) || BUILTIN_TYPES.contains(&n);
        for (file, ast) in files {
            let mut types: Vec<&syn::Type> = Vec::new();
            for item in &ast.items {
                match item {
                    syn::Item::Fn(f) => sig_types(&f.sig, &mut types),
                    syn::Item::Struct(s) => types.extend(s.fields.iter().map(|f| &f.ty)),
                    syn::Item::Impl(i) => i.items.iter().for_each(|it| {
                        if let syn::ImplItem::Fn(f) = it {
                            sig_types(&f.sig, &mut types)
                        }
                    }),
                    syn::Item::Const(c) => types.push(&c.ty),
                    _ => {}
                }
            }
            for t in types {
                let mut names = Vec::new();
                read_ty(*file, t)?.named(&mut names);
                if let Some(n) = names.iter().find(|n| !known(n) && n.as_str() != "Self") {
                    let candidates: Vec<&str> =
                        self.structs.keys().map(String::as_str).chain(BUILTIN_TYPES.iter().copied()).collect();
                    return Err(Error::new(
                        DiagKind::UnknownType,
                        Span::of(*file, t.span()),
                        format!("unknown type `{n}`"),
                    )
                    .label("not a struct of this file, of the library, or a built-in type")
                    .maybe_help(did_you_mean(n, candidates)));
                }
            }
        }
        Ok(())
    }

    /// Names a suggestion for an unknown function may pick from.
    pub fn fn_names(&self) -> impl Iterator<Item = &str> {
        self.fns.keys().map(String::as_str)
    }
}

fn sig_types<'s>(sig: &'s syn::Signature, out: &mut Vec<&'s syn::Type>) {
    for arg in &sig.inputs {
        if let syn::FnArg::Typed(t) = arg {
            out.push(&t.ty);
        }
    }
    if let syn::ReturnType::Type(_, t) = &sig.output {
        out.push(t);
    }
}

fn unsupported(file: FileId, span: proc_macro2::Span, msg: &str) -> Error {
    Error::new(DiagKind::Unsupported, Span::of(file, span), msg)
}

fn read_ty(file: FileId, t: &syn::Type) -> Result<Ty, Error> {
    Ty::from_syn(t).map_err(|(s, m)| unsupported(file, s, &m))
}

/// `use tunec::prelude::*;` is accepted and means nothing: the prelude is always there. Nothing else can be
/// imported (a recipe has no access to `std`: no files, environment or processes).
fn check_use(file: FileId, u: &syn::ItemUse) -> Result<(), Error> {
    let prelude = match &u.tree {
        syn::UseTree::Path(p) if p.ident == "tunec" => match &*p.tree {
            syn::UseTree::Path(q) if q.ident == "prelude" => matches!(&*q.tree, syn::UseTree::Glob(_)),
            _ => false,
        },
        _ => false,
    };
    if prelude {
        return Ok(());
    }
    Err(unsupported(file, u.span(), "recipes can only `use tunec::prelude::*;`").label("not available"))
}

fn fn_def<'a>(file: FileId, sig: &'a syn::Signature, body: &'a syn::Block) -> Result<FnDef<'a>, Error> {
    if !sig.generics.params.is_empty() {
        return Err(unsupported(file, sig.generics.span(), "generic functions are not supported in recipes"));
    }
    if sig.asyncness.is_some() || sig.variadic.is_some() {
        return Err(unsupported(file, sig.span(), "this kind of function is not supported in recipes"));
    }
    let mut params = Vec::new();
    let mut has_self = false;
    for arg in &sig.inputs {
        match arg {
            syn::FnArg::Receiver(_) => has_self = true,
            syn::FnArg::Typed(t) => {
                params.push(ParamDef { pat: &t.pat, ty: read_ty(file, &t.ty)?, span: Span::of(file, t.span()) })
            }
        }
    }
    let ret = match &sig.output {
        syn::ReturnType::Default => Ty::Unit,
        syn::ReturnType::Type(_, t) => read_ty(file, t)?,
    };
    Ok(FnDef { name: sig.ident.to_string(), file, span: Span::of(file, sig.ident.span()), params, has_self, ret, body })
}

fn struct_def(file: FileId, s: &syn::ItemStruct) -> Result<StructDef, Error> {
    if !s.generics.params.is_empty() {
        return Err(unsupported(file, s.generics.span(), "generic structs are not supported in recipes"));
    }
    let syn::Fields::Named(named) = &s.fields else {
        return Err(unsupported(file, s.span(), "recipes declare structs with named fields: `struct S { x: f64 }`"));
    };
    let mut fields = Vec::new();
    for f in &named.named {
        let Some(id) = &f.ident else { continue };
        fields.push(FieldDef { name: id.to_string(), ty: read_ty(file, &f.ty)?, default: None, doc: "" });
    }
    Ok(StructDef { name: s.ident.to_string(), fields, span: Some(Span::of(file, s.ident.span())) })
}

/// The type an `impl` block is for; only `impl T { .. }` and `impl Default for T { .. }`.
fn impl_type(file: FileId, i: &syn::ItemImpl) -> Result<String, Error> {
    if let Some((_, path, _)) = &i.trait_ {
        if !path.is_ident("Default") {
            return Err(unsupported(file, path.span(), "the only trait recipes implement is `Default`"));
        }
    }
    match &*i.self_ty {
        syn::Type::Path(p) if p.path.segments.len() == 1 && i.generics.params.is_empty() => {
            Ok(p.path.segments[0].ident.to_string())
        }
        t => Err(unsupported(file, t.span(), "`impl` blocks are for a struct of the file: `impl MyConfig { .. }`")),
    }
}
