//! Code generation: the lock-check-execute-mark wrapper around the user's body.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ItemFn, LitStr, Pat, ReturnType, Type};

use crate::attr::Args;
use crate::template::{self, Piece};

/// Entry point on `proc_macro2` streams. On any error the user's item is emitted unchanged next to
/// the error, so one mistake gives one error and IDEs keep working.
pub(crate) fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            let err = syn::Error::new(
                Span::call_site(),
                "#[idempotent] goes on an `async fn` that returns `Result<T, E>`",
            );
            return with_error(item, err);
        }
    };
    let args = syn::parse2::<Args>(args);
    match args.and_then(|a| expand(a, &func)) {
        Ok(ts) => ts,
        Err(e) => with_error(item, e),
    }
}

fn with_error(item: TokenStream, err: syn::Error) -> TokenStream {
    let err = err.into_compile_error();
    quote!(#item #err)
}

/// A parameter the key and fingerprint can name, including names bound by patterns
/// (`Json(order): Json<Order>` binds `order`).
struct Params {
    names: Vec<Ident>,
    /// `Some(by_ref)` for methods.
    receiver: Option<bool>,
}

impl Params {
    fn of(func: &ItemFn) -> Params {
        let mut names = Vec::new();
        let mut receiver = None;
        for arg in &func.sig.inputs {
            match arg {
                FnArg::Receiver(r) => receiver = Some(matches!(&*r.ty, Type::Reference(_))),
                FnArg::Typed(t) => bind_names(&t.pat, &mut names),
            }
        }
        Params { names, receiver }
    }

    fn has(&self, name: &str) -> bool {
        (name == "self" && self.receiver.is_some()) || self.names.iter().any(|n| n == name)
    }

    fn list(&self) -> String {
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

    fn closest(&self, name: &str) -> Option<String> {
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

fn bind_names(pat: &Pat, out: &mut Vec<Ident>) {
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

fn edit_distance(a: &str, b: &str) -> usize {
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
fn path_expr(
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
            format!("`{what}` names `self`, but `{name}` is not a method")
        } else {
            format!(
                "`{what}` names `{root}`, which is not a parameter of `{name}`; {}",
                params.list()
            )
        };
        if let Some(best) = params.closest(root) {
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

fn mentions(tokens: TokenStream, name: &str) -> bool {
    tokens.into_iter().any(|t| match t {
        TokenTree::Ident(i) => i == name,
        TokenTree::Group(g) => mentions(g.stream(), name),
        _ => false,
    })
}

fn expand(mut args: Args, func: &ItemFn) -> syn::Result<TokenStream> {
    let sig = &func.sig;
    let mut errors: Vec<syn::Error> = std::mem::take(&mut args.errors);
    if let Some(c) = &sig.constness {
        errors.push(syn::Error::new(
            c.span,
            "#[idempotent] cannot wrap a `const fn`: it talks to a store at run time; remove `const` and make it `async`",
        ));
    }
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new(
            sig.fn_token.span,
            "the `async` keyword is missing from the function declaration: #[idempotent] wraps an `async fn` (write `async fn`)",
        ));
    }
    let ret = match &sig.output {
        ReturnType::Default => {
            errors.push(syn::Error::new(
                sig.paren_token.span.close(),
                format!(
                    "`{}` returns nothing: #[idempotent] functions return `Result<T, E>` (add `-> Result<(), YourError>`), so a failure releases the key for a redelivery",
                    sig.ident
                ),
            ));
            None
        }
        ReturnType::Type(_, ty) if matches!(**ty, Type::ImplTrait(_)) => {
            errors.push(syn::Error::new(
                ty.span(),
                "#[idempotent] needs a concrete `Result<T, E>` return type: `T` is stored and replayed, so it cannot be `impl Trait`",
            ));
            None
        }
        ReturnType::Type(_, ty) => Some(ty),
    };
    let params = Params::of(func);

    let Some(key_lit) = &args.key else {
        errors.push(syn::Error::new(
            Span::call_site(),
            "missing `key`: name the parameter that identifies the message, e.g. #[idempotent(key = \"order_id\")]",
        ));
        return Err(combine(errors));
    };

    let krate = args
        .krate
        .as_ref()
        .map(|(_, p)| quote!(#p))
        .unwrap_or_else(|| quote!(::idem_runtime));

    // The key: one value, or a template whose parts are escaped against its literal text.
    let key_expr = match template::parse(&key_lit.value()) {
        Err(msg) => {
            errors.push(syn::Error::new(key_lit.span(), msg));
            None
        }
        Ok(pieces) => {
            let span = key_lit.span();
            if let [Piece::Path(path)] = pieces.as_slice() {
                match path_expr(path, key_lit, "key", func, &params) {
                    Ok(e) => Some(
                        quote_spanned!(span=> #krate::Key::new(#krate::__private::key_part(&(#e)))),
                    ),
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                }
            } else {
                let mut reserved = String::new();
                let mut steps = TokenStream::new();
                for piece in &pieces {
                    match piece {
                        Piece::Lit(text) => {
                            for c in text.chars() {
                                if !reserved.contains(c) {
                                    reserved.push(c);
                                }
                            }
                            steps.extend(quote!(__idem_key.lit(#text);));
                        }
                        Piece::Path(path) => match path_expr(path, key_lit, "key", func, &params) {
                            Ok(e) => steps.extend(quote_spanned!(span=>
                                __idem_key.part(#krate::__private::key_part(&(#e)));
                            )),
                            Err(e) => errors.push(e),
                        },
                    }
                }
                Some(quote! {{
                    let mut __idem_key = #krate::KeyBuilder::new(#reserved);
                    #steps
                    __idem_key.finish()
                }})
            }
        }
    };

    let mut fingerprint = TokenStream::new();
    if let Some((lit, names)) = &args.fingerprint {
        let mut adds = TokenStream::new();
        for (name, _) in names {
            match template::parse(name) {
                Ok(pieces) if matches!(pieces.as_slice(), [Piece::Path(_)]) => {
                    let Piece::Path(path) = &pieces[0] else {
                        unreachable!()
                    };
                    match path_expr(path, lit, "fingerprint", func, &params) {
                        Ok(e) => adds.extend(quote!(.add(&(#e)))),
                        Err(e) => errors.push(e),
                    }
                }
                _ => errors.push(syn::Error::new(
                    lit.span(),
                    format!("`{name}` in `fingerprint` is not a parameter or a field path; list them separated by commas, e.g. fingerprint = \"amount, currency\""),
                )),
            }
        }
        fingerprint = quote!(.fingerprint(#krate::Fingerprint::builder() #adds .finish()));
    }

    // The store: an expression, or the process-wide default.
    let mut moves = true;
    let store = match &args.store {
        None => quote!(&#krate::DefaultStore),
        Some((lit, expr)) => {
            let tokens = quote!(#expr);
            if params.receiver == Some(false) && mentions(tokens.clone(), "self") {
                errors.push(syn::Error::new(
                    lit.span(),
                    format!(
                        "`store` borrows `self` for the whole call, but `{}` takes `self` by value, which the handler's body owns; take `&self`, or give a store that does not live in `self`",
                        sig.ident
                    ),
                ));
            }
            // A store borrowed from a by-value parameter must not be moved into the body: capture
            // by reference then (the body can still move other parameters).
            if params
                .names
                .iter()
                .any(|n| mentions(tokens.clone(), &n.to_string()))
            {
                moves = false;
            }
            let span = lit.span();
            quote_spanned!(span=> &(#expr))
        }
    };

    if !errors.is_empty() {
        return Err(combine(errors));
    }
    let (Some(ret), Some(key_expr)) = (ret, key_expr) else {
        unreachable!("errors were reported above")
    };

    let scope = match &args.scope {
        Some(lit) => quote!(#lit),
        None => {
            let name = sig.ident.to_string();
            quote!(::core::concat!(::core::module_path!(), "::", #name))
        }
    };
    let ms = |d: &crate::attr::Dur| {
        let ms = d.ms;
        quote_spanned!(d.lit.span()=> ::core::time::Duration::from_millis(#ms))
    };
    let mut options = quote!(#krate::Options::new(#scope));
    if let Some(d) = &args.ttl {
        let d = ms(d);
        options.extend(quote!(.ttl(#d)));
    }
    if let Some(d) = &args.keep {
        let d = ms(d);
        options.extend(quote!(.keep(#d)));
    }
    if let Some(d) = &args.wait {
        let d = ms(d);
        options.extend(quote!(.wait(#d)));
    }

    let attrs = &func.attrs;
    let vis = &func.vis;
    let block = &func.block;
    let capture = if moves { quote!(move) } else { quote!() };
    // Bounds on the return type are checked at its span, so "must return Result" points there.
    let run = quote_spanned!(ret.span()=> #krate::__private::run_future::<_, #ret, _>);
    let typed = quote_spanned!(ret.span()=> #krate::__private::typed::<#ret, _>);
    Ok(quote! {
        #(#attrs)*
        #vis #sig {
            let __idem_call = #krate::Call::from_key(#key_expr) #fingerprint;
            const __IDEM_OPTIONS: #krate::Options = #options;
            #run(#store, &__IDEM_OPTIONS, __idem_call, #typed(async #capture #block)).await
        }
    })
}

fn combine(errors: Vec<syn::Error>) -> syn::Error {
    let mut it = errors.into_iter();
    let mut first = it.next().expect("at least one error");
    for e in it {
        first.combine(e);
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(args: &str, item: &str) -> String {
        idempotent(args.parse().unwrap(), item.parse().unwrap()).to_string()
    }

    #[test]
    fn wraps_the_body_and_keeps_the_signature() {
        let out = expand_str(
            r#"key = "order_id", ttl = "10m""#,
            "async fn f(order_id: u64) -> Result<u32, E> { Ok(1) }",
        );
        assert!(
            out.contains("async fn f (order_id : u64) -> Result < u32 , E >"),
            "{out}"
        );
        assert!(out.contains("run_future"), "{out}");
        assert!(out.contains("from_millis (600000u64)"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn names_bound_by_patterns_are_parameters() {
        let out = expand_str(
            r#"key = "order.id""#,
            "async fn f(Json(order): Json<Order>) -> Result<(), E> { Ok(()) }",
        );
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn unknown_key_suggests_the_closest_parameter() {
        let out = expand_str(
            r#"key = "ordr_id""#,
            "async fn f(order_id: u64) -> Result<(), E> { Ok(()) }",
        );
        assert!(out.contains("did you mean `order_id`"), "{out}");
        // The user's item is still emitted.
        assert!(out.contains("async fn f"), "{out}");
    }

    #[test]
    fn errors_are_collected_not_stopped_at_the_first() {
        let out = expand_str(
            r#"key = "nope", ttl = "0s""#,
            "fn f(order_id: u64) -> Result<(), E> { Ok(()) }",
        );
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
    }
}
