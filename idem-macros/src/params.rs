//! The function's parameters: what `key`, `fingerprint`, `store` and `tx` can name, and what
//! makes a handler generic.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned};
use syn::{Expr, FnArg, Ident, ItemFn, LitStr, Pat, ReturnType, Type};

/// The span of the first `impl` in a type (`Result<impl Serialize, E>`), if any.
pub(crate) fn impl_trait_in(tokens: TokenStream) -> Option<Span> {
    tokens.into_iter().find_map(|t| match t {
        TokenTree::Ident(i) if i == "impl" => Some(i.span()),
        TokenTree::Group(g) => impl_trait_in(g.stream()),
        _ => None,
    })
}

/// A parameter the key and fingerprint can name, including names bound by patterns
/// (`Json(order): Json<Order>` binds `order`).
pub(crate) struct Params {
    pub(crate) names: Vec<Ident>,
    /// `Some(by_ref)` for methods.
    pub(crate) receiver: Option<bool>,
    /// The receiver is `&mut self`.
    pub(crate) receiver_mut: bool,
}

impl Params {
    pub(crate) fn of(func: &ItemFn) -> Params {
        let mut names = Vec::new();
        let mut receiver = None;
        let mut receiver_mut = false;
        for arg in &func.sig.inputs {
            match arg {
                FnArg::Receiver(r) => {
                    receiver = Some(matches!(&*r.ty, Type::Reference(_)));
                    receiver_mut = matches!(&*r.ty, Type::Reference(t) if t.mutability.is_some());
                }
                FnArg::Typed(t) => bind_names(&t.pat, &mut names),
            }
        }
        Params {
            names,
            receiver,
            receiver_mut,
        }
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        (name == "self" && self.receiver.is_some()) || self.names.iter().any(|n| n == name)
    }

    pub(crate) fn list(&self) -> String {
        let mut all: Vec<String> = self.names.iter().map(|n| format!("`{n}`")).collect();
        if self.receiver.is_some() {
            all.insert(0, "`self`".into());
        }
        if all.is_empty() {
            "it has none".into()
        } else {
            format!("its parameters are {}", all.join(", "))
        }
    }

    pub(crate) fn closest(&self, name: &str) -> Option<String> {
        self.names
            .iter()
            .map(|n| n.to_string())
            .chain(self.receiver.map(|_| "self".to_owned()))
            .map(|n| (edit_distance(&n, name), n))
            .filter(|(d, n)| *d <= 2.max(n.len() / 3))
            .min()
            .map(|(_, n)| n)
    }
}

pub(crate) fn bind_names(pat: &Pat, out: &mut Vec<Ident>) {
    match pat {
        Pat::Ident(p) => {
            out.push(p.ident.clone());
            if let Some((_, sub)) = &p.subpat {
                bind_names(sub, out);
            }
        }
        Pat::Tuple(t) => t.elems.iter().for_each(|p| bind_names(p, out)),
        Pat::TupleStruct(t) => t.elems.iter().for_each(|p| bind_names(p, out)),
        Pat::Struct(s) => s.fields.iter().for_each(|f| bind_names(&f.pat, out)),
        Pat::Reference(r) => bind_names(&r.pat, out),
        Pat::Slice(s) => s.elems.iter().for_each(|p| bind_names(p, out)),
        Pat::Type(t) => bind_names(&t.pat, out),
        Pat::Paren(p) => bind_names(&p.pat, out),
        _ => {}
    }
}

pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Check that a path's root is a parameter, and build the expression for it on the literal's span
/// (so "no field `x` on type `Order`" points at the key literal).
pub(crate) fn path_expr(
    path: &[String],
    lit: &LitStr,
    what: &str,
    func: &ItemFn,
    params: &Params,
) -> syn::Result<TokenStream> {
    let span = lit.span();
    let root = &path[0];
    if !params.has(root) {
        let name = &func.sig.ident;
        let mut msg = if root == "self" {
            format!(
                "`{what}` names `self`, but `{name}` is not a method; {}",
                params.list()
            )
        } else {
            format!(
                "`{what}` names `{root}`, which is not a parameter of `{name}`; {}",
                params.list()
            )
        };
        if root == "self" && path.len() > 1 && params.has(&path[1]) {
            // `self.order_id` in a free fn that has an `order_id` parameter.
            msg.push_str(&format!("; did you mean `{}`?", path[1..].join(".")));
        } else if let Some(best) = params.closest(root) {
            msg.push_str(&format!("; did you mean `{best}`?"));
        }
        return Err(syn::Error::new(span, msg));
    }
    let mut ts = if root == "self" {
        quote_spanned!(span=> self)
    } else {
        let id = Ident::new(root, span);
        quote!(#id)
    };
    for field in &path[1..] {
        if let Ok(index) = field.parse::<u32>() {
            let index = syn::Index { index, span };
            ts.extend(quote!(.#index));
        } else {
            let id = Ident::new(field, span);
            ts.extend(quote!(.#id));
        }
    }
    Ok(ts)
}

pub(crate) fn mentions(tokens: TokenStream, name: &str) -> bool {
    tokens.into_iter().any(|t| match t {
        TokenTree::Ident(i) => i == name,
        TokenTree::Group(g) => mentions(g.stream(), name),
        _ => false,
    })
}

/// The first part of the signature that makes the handler generic over types: a type or const
/// parameter, or an `impl Trait` argument. Lifetimes do not count, nor a type parameter that only
/// picks the store (it appears only in the types of the parameters the `store` expression uses):
/// that changes where records are kept, not what the handler does.
pub(crate) fn generic_part(sig: &syn::Signature, store: Option<&Expr>) -> Option<(Span, String)> {
    let store_tokens = store.map(|e| quote!(#e));
    let is_store_param = |pat: &Pat| {
        let mut names = Vec::new();
        bind_names(pat, &mut names);
        store_tokens
            .as_ref()
            .is_some_and(|t| names.iter().any(|n| mentions(t.clone(), &n.to_string())))
    };
    // The types of the store's parameters, and of the rest of the signature.
    let (mut store_types, mut elsewhere) = (TokenStream::new(), TokenStream::new());
    if let ReturnType::Type(_, ty) = &sig.output {
        elsewhere.extend(quote!(#ty));
    }
    for arg in &sig.inputs {
        let FnArg::Typed(t) = arg else { continue };
        let ty = &t.ty;
        if is_store_param(&t.pat) {
            store_types.extend(quote!(#ty));
            continue;
        }
        elsewhere.extend(quote!(#ty));
        if let Some(span) = impl_trait_in(quote!(#ty)) {
            return Some((span, "an `impl Trait` argument".to_owned()));
        }
    }
    sig.generics.params.iter().find_map(|p| match p {
        syn::GenericParam::Type(t) => {
            let name = t.ident.to_string();
            let picks_the_store_only =
                mentions(store_types.clone(), &name) && !mentions(elsewhere.clone(), &name);
            (!picks_the_store_only).then(|| (t.ident.span(), format!("`{}`", t.ident)))
        }
        syn::GenericParam::Const(c) => Some((c.ident.span(), format!("`{}`", c.ident))),
        syn::GenericParam::Lifetime(_) => None,
    })
}

/// The parameter `tx = "..."` names: a plain name whose type is `&mut ...` (the transaction is
/// borrowed back after the body, so it must be a mutable reference the caller keeps).
pub(crate) fn tx_param(func: &ItemFn, lit: &LitStr, params: &Params) -> syn::Result<Ident> {
    let name = lit.value();
    for arg in &func.sig.inputs {
        let FnArg::Typed(t) = arg else { continue };
        let Pat::Ident(p) = &*t.pat else { continue };
        if p.ident != name {
            continue;
        }
        return match &*t.ty {
            Type::Reference(r) if r.mutability.is_some() => Ok(p.ident.clone()),
            other => Err(syn::Error::new_spanned(
                other,
                format!(
                    "`{name}` must be a mutable reference to the transaction, e.g. `{name}: &mut Transaction<'_, Postgres>`: idem writes the done mark in it and leaves the commit to the caller"
                ),
            )),
        };
    }
    let mut msg = format!(
        "`tx` names `{name}`, which is not a parameter of `{}`; {}",
        func.sig.ident,
        params.list()
    );
    if let Some(best) = params.closest(&name) {
        msg.push_str(&format!("; did you mean `{best}`?"));
    }
    Err(syn::Error::new(lit.span(), msg))
}
