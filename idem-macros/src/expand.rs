//! Code generation: the lock-check-execute-mark wrapper around the user's body.

use proc_macro2::{Group, Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ItemFn, ReturnType};

use crate::attr::Args;
use crate::params::{Params, generic_part, impl_trait_in, tx_param};

/// Entry point on `proc_macro2` streams. On any error the user's item is emitted unchanged next to
/// the error, so one mistake gives one error and IDEs keep working.
pub(crate) fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => return with_error(item.clone(), not_a_fn(item)),
    };
    match syn::parse2::<Args>(args) {
        Ok(args) => expand(args, &func, item),
        Err(e) => with_error(item, e),
    }
}

fn with_error(item: TokenStream, err: syn::Error) -> TokenStream {
    let err = err.into_compile_error();
    quote!(#item #err)
}

/// The error for an item that is not a function with a body, on the item's own keyword.
fn not_a_fn(item: TokenStream) -> syn::Error {
    const WHAT: &str = "#[idempotent] goes on an `async fn` that returns `Result<T, E>`";
    if let Ok(decl) = syn::parse2::<syn::TraitItemFn>(item.clone())
        && decl.default.is_none()
    {
        let span = decl
            .semi_token
            .map_or_else(|| decl.sig.ident.span(), |s| s.span);
        return syn::Error::new(
            span,
            format!(
                "#[idempotent] needs the function's body, and `{}` has none: put the attribute on the method in each `impl` block instead",
                decl.sig.ident
            ),
        );
    }
    let (span, kind) = match syn::parse2::<syn::Item>(item) {
        Ok(syn::Item::Struct(i)) => (i.struct_token.span, "a struct"),
        Ok(syn::Item::Enum(i)) => (i.enum_token.span, "an enum"),
        Ok(syn::Item::Union(i)) => (i.union_token.span, "a union"),
        Ok(syn::Item::Trait(i)) => (i.trait_token.span, "a trait"),
        Ok(syn::Item::Impl(i)) => (
            i.impl_token.span,
            "an `impl` block (put it on the methods inside)",
        ),
        Ok(syn::Item::Mod(i)) => (i.mod_token.span, "a module"),
        Ok(syn::Item::Const(i)) => (i.const_token.span, "a constant"),
        Ok(syn::Item::Static(i)) => (i.static_token.span, "a static"),
        Ok(syn::Item::Type(i)) => (i.type_token.span, "a type alias"),
        Ok(syn::Item::Use(i)) => (i.use_token.span, "a `use` declaration"),
        Ok(syn::Item::ForeignMod(i)) => (i.abi.extern_token.span, "an `extern` block"),
        _ => return syn::Error::new(Span::call_site(), WHAT),
    };
    syn::Error::new(span, format!("{WHAT}, not on {kind}"))
}

/// Give every token of `tokens` the span `span`, so that errors about the code they form are
/// reported there (`span` must come from the user's attribute or signature, for hygiene).
pub(crate) fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut t| {
            if let TokenTree::Group(g) = &t {
                let mut group = Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                t = TokenTree::Group(group);
            } else {
                t.set_span(span);
            }
            t
        })
        .collect()
}

/// What the wrapper wraps: the user's body and output type, and where the new body goes.
struct Wrapped<'a> {
    /// `R`, the handler's `Result`.
    ret: &'a syn::Type,
    /// The body that runs once per key.
    block: &'a syn::Block,
    /// The span of the `async` keyword the wrapper's blocks take.
    async_span: Option<Span>,
    /// `Some` for an `#[async_trait]` method: the `Box::pin(..)` around the new body.
    boxed: Option<&'a syn::ExprCall>,
}

fn expand(mut args: Args, func: &ItemFn, item: TokenStream) -> TokenStream {
    let sig = &func.sig;
    let mut errors: Vec<syn::Error> = std::mem::take(&mut args.errors);
    let krate =
        args.krate.as_ref().map(|(_, p)| quote!(#p)).unwrap_or_else(
            || match crate::krate::renamed() {
                Some(name) => {
                    let name = Ident::new(name, Span::call_site());
                    quote!(::#name)
                }
                None => quote!(::idem_runtime),
            },
        );
    if let Some(c) = &sig.constness {
        errors.push(syn::Error::new(
            c.span,
            "#[idempotent] cannot wrap a `const fn`: it talks to a store at run time; remove `const` and make it `async`",
        ));
    }
    // A method of an `#[async_trait]` impl comes rewritten, without its `async`.
    let rewritten = match crate::async_trait::rewritten(func) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            errors.push(e);
            None
        }
        // A `const fn` is told to become `async` by the error above: one error for one mistake.
        None => {
            if sig.asyncness.is_none() && sig.constness.is_none() {
                errors.push(syn::Error::new(
                    sig.fn_token.span,
                    "the `async` keyword is missing from the function declaration: #[idempotent] wraps an `async fn` (write `async fn`)",
                ));
            }
            None
        }
    };
    let returns_nothing = |errors: &mut Vec<syn::Error>| {
        errors.push(syn::Error::new(
            sig.paren_token.span.close(),
            format!(
                "`{}` returns nothing: #[idempotent] functions return `Result<T, E>` (add `-> Result<(), YourError>`), so a failure releases the key for a redelivery",
                sig.ident
            ),
        ));
    };
    let ret = match (&rewritten, &sig.output) {
        // async-trait writes `Output = ()` for a fn that returns nothing.
        (Some(r), _) if matches!(r.output, syn::Type::Tuple(t) if t.elems.is_empty()) => {
            returns_nothing(&mut errors);
            None
        }
        (Some(r), _) => Some(r.output),
        (None, ReturnType::Default) => {
            returns_nothing(&mut errors);
            None
        }
        (None, ReturnType::Type(_, ty)) => Some(&**ty),
    };
    let ret = ret.filter(|ty| match impl_trait_in(quote!(#ty)) {
        Some(span) => {
            errors.push(syn::Error::new(
                span,
                "#[idempotent] needs a concrete `Result<T, E>` return type: `T` is stored and replayed, so it cannot be `impl Trait`; name the type",
            ));
            false
        }
        None => true,
    });
    let params = Params::of(func);

    // The default scope is the module path and the fn name, which tells apart only fns that are
    // module items and not generic. Each way it would not gets its own error.
    let mut check = TokenStream::new();
    if args.scope.is_none() {
        if let Some((span, what)) = generic_part(sig, args.store.as_ref().map(|(_, e)| e)) {
            // Instantiations would share it: one could replay another's output, or be suppressed
            // by another's record. Refuse to guess.
            errors.push(syn::Error::new(
                span,
                format!(
                    "`{}` is generic over {what}, so all its instantiations would share one default scope, and one instantiation could replay another's output or be suppressed by another's record; name the scope they share, e.g. scope = \"{}\", and put what tells them apart in `key`",
                    sig.ident, sig.ident
                ),
            ));
        } else if let Some(FnArg::Receiver(r)) = sig.inputs.first() {
            // It does not name the type: `handle` on two types of one module would share it.
            errors.push(syn::Error::new(
                r.self_token.span,
                format!(
                    "`{}` is a method, and the default scope (module path and fn name) does not name its type: methods of that name on two types of one module would share one key space and replay each other's outputs; name the scope, e.g. scope = \"orders.{}\"",
                    sig.ident, sig.ident
                ),
            ));
        } else {
            // An associated fn without `self`: only rustc knows, see `module_item`.
            check = crate::module_item::check(&krate);
        }
    }
    let fail = |errors: Vec<syn::Error>| {
        let err = combine(errors).into_compile_error();
        quote!(#check #item #err)
    };

    // The transactional form: the parameter that is the transaction.
    let tx = args
        .tx
        .as_ref()
        .and_then(|lit| match tx_param(func, lit, &params) {
            Ok(ident) => Some(ident),
            Err(e) => {
                errors.push(e);
                None
            }
        });

    let Some(key_lit) = &args.key else {
        let example = params
            .names
            .first()
            .map_or_else(|| "order_id".to_owned(), ToString::to_string);
        errors.push(syn::Error::new(
            Span::call_site(),
            format!(
                "missing `key`: name the parameter that identifies the message, e.g. #[idempotent(key = \"{example}\")]"
            ),
        ));
        return fail(errors);
    };
    let key_expr = crate::key::key_expr(key_lit, &krate, func, &params, &mut errors);
    let fingerprint = crate::key::fingerprint(&args, &krate, func, &params, &mut errors);
    let (store, store_use, moves) = crate::store::store(&args, &krate, &params, sig, &mut errors);

    if !errors.is_empty() {
        return fail(errors);
    }
    let (Some(ret), Some(key_expr)) = (ret, key_expr) else {
        unreachable!("errors were reported above")
    };
    let wrapped = match &rewritten {
        Some(r) => Wrapped {
            ret,
            block: r.block,
            async_span: Some(r.async_span),
            boxed: Some(r.call),
        },
        None => Wrapped {
            ret,
            block: &func.block,
            async_span: sig.asyncness.map(|a| a.span),
            boxed: None,
        },
    };
    let options = options(&args, &krate, sig);

    let attrs = &func.attrs;
    let vis = &func.vis;
    let block = wrapped.block;
    let ret = wrapped.ret;
    let capture = if moves { quote!(move) } else { quote!() };
    // Bounds on the return type are checked at its span, so "must return Result" points there.
    // The whole call (path, parentheses, `.await`) is spanned there: obligations of the awaited
    // future land on the same span as those of the call, and rustc reports them once.
    let ret_span = ret.span();
    let krate_ret = respan(krate.clone(), ret_span);
    // The body's value is bound to the return type, as a fn body is: a body that ends without
    // its `Result` (an empty body, a stray `;`) is one "mismatched types" error on the body.
    // A web handler's `Json<T>` (or `(StatusCode, Json<T>)`) is stored as the `T` inside it.
    let shape = crate::shape::Shape::of(ret);
    let stored = shape.unwrap_stored(quote!(__idem_out));
    let body = quote!({
        let __idem_out: #ret = #block;
        #stored
    });
    // `async` on the user's own keyword: a borrow conflict in the body points at their fn.
    let async_token = match wrapped.async_span {
        Some(span) => quote_spanned!(span=> async),
        None => quote!(async),
    };
    // Checked on the parameter itself, so a parameter that is not a transaction is one error.
    let tx_access = tx.as_ref().map(|tx| {
        let krate = respan(krate.clone(), tx.span());
        quote_spanned!(tx.span()=> let __idem_tx_access = #krate::__private::tx_access(&*#tx);)
    });
    let (args, entry) = match &tx {
        // The body becomes an async closure over the transaction, which the wrapper hands back
        // after the body ran, to write the done mark in it.
        // The body borrows the transaction and hands it back when it is done: the inner block
        // is not `move`, so it only borrows `tx` (and moves what the body moves).
        Some(tx) => (
            quote!(#store, &__IDEM_OPTIONS, __idem_call, #tx, __idem_tx_access, #capture |#tx| #async_token #capture {
                let __idem_out = #async_token #body.await;
                (__idem_out, #tx)
            }),
            quote_spanned!(ret_span=> #krate_ret::__private::run_tx_future),
        ),
        None => (
            quote!(#store, &__IDEM_OPTIONS, __idem_call, #async_token #capture #body),
            quote_spanned!(ret_span=> #krate_ret::__private::run_future),
        ),
    };
    // `R` is inferred from the body (pinned by its binding to the return type): a
    // turbofish would add a second span (the whole type) to errors that are also reported on its
    // first token.
    let mut run = entry;
    let mut parens = Group::new(proc_macro2::Delimiter::Parenthesis, args);
    parens.set_span(ret_span);
    run.extend([TokenTree::Group(parens)]);
    run.extend(quote_spanned!(ret_span=> .await));
    let run = match shape {
        crate::shape::Shape::Plain => run,
        _ => {
            let back = shape.rewrap(quote!(__idem_r));
            quote!({
                let __idem_r = #run;
                #back
            })
        }
    };
    let mut stmts = quote! {
        #store_use
        let __idem_call = #key_expr #fingerprint;
        #tx_access
        const __IDEM_OPTIONS: #krate::Options = #options;
        #run
    };
    // An `#[async_trait]` method keeps its boxing: the wrapper runs in the boxed block, where
    // async-trait's own rebinding of `self` and of the parameters stays, inside the body.
    if let Some(call) = wrapped.boxed {
        let pin = &call.func;
        stmts = quote!(#pin(#async_token move { #stmts }));
    }
    // The new body keeps the user's braces' span, so the item is still the user's code to rustc:
    // "function is never used" and other lints on the fn keep working.
    let mut body = Group::new(proc_macro2::Delimiter::Brace, stmts);
    body.set_span(func.block.brace_token.span.join());
    quote! {
        #check
        #(#attrs)*
        #vis #sig #body
    }
}

/// The `Options` constant's expression.
fn options(args: &Args, krate: &TokenStream, sig: &syn::Signature) -> TokenStream {
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
    match &args.max_lease {
        Some(Some(d)) => {
            let d = ms(d);
            options.extend(quote!(.max_lease(#d)));
        }
        Some(None) => options.extend(quote!(.renew_forever())),
        None => {}
    }
    if let Some((lit, bytes)) = &args.max_output {
        let bytes = *bytes as usize;
        options.extend(quote_spanned!(lit.span()=> .max_output(#bytes)));
    }
    options
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
    fn one_mistake_gives_one_error() {
        for (args, item) in [
            // Not also "the `async` keyword is missing".
            (
                r#"key = "id""#,
                "const fn f(id: u64) -> Result<(), E> { Ok(()) }",
            ),
            // Not also "missing `key`".
            (
                r#"key = """#,
                "async fn f(id: u64) -> Result<(), E> { Ok(()) }",
            ),
            // Reported by the macro, not by rustc on a turbofish.
            (
                r#"key = "id""#,
                "async fn f(id: u64) -> Result<impl Debug, E> { Ok(id) }",
            ),
            (r#"key = "id""#, "struct S { id: u64 }"),
            (
                r#"key = "id""#,
                "async fn f(&self, id: u64) -> Result<(), E>;",
            ),
        ] {
            let out = expand_str(args, item);
            assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        }
        let out = expand_str(r#"key = "id""#, "struct S { id: u64 }");
        assert!(out.contains("not on a struct"), "{out}");
    }

    #[test]
    fn a_store_expression_is_checked_on_its_own() {
        let out = expand_str(
            r#"key = "id", store = "store""#,
            "async fn f(store: &S, id: u64) -> Result<(), E> { Ok(()) }",
        );
        assert!(out.contains("store_ref"), "{out}");
        // Borrowed from a parameter: the body is not `async move`.
        assert!(!out.contains("async move"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn errors_are_collected_not_stopped_at_the_first() {
        let out = expand_str(
            r#"key = "nope", ttl = "0s""#,
            "fn f(order_id: u64) -> Result<(), E> { Ok(()) }",
        );
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
    }

    #[test]
    fn a_template_key_is_one_expression_that_drops_no_result() {
        let out = expand_str(
            r#"key = "{tenant}:{id}""#,
            "async fn f(tenant: &str, id: u64) -> Result<(), E> { Ok(()) }",
        );
        // `lit` and `part` return `&mut KeyBuilder`: chained, not statements whose value is
        // dropped (which `#![deny(unused_results)]` refuses).
        assert!(
            out.contains(":: KeyBuilder :: new (\":\") . part ("),
            "{out}"
        );
        assert!(out.contains(". lit (\":\") . part ("), "{out}");
        assert!(!out.contains("__idem_key"), "{out}");
    }

    #[test]
    fn the_expansion_carries_no_tool_attribute() {
        let out = expand_str(
            r#"key = "id", store = "self.idem", fingerprint = "id", scope = "s""#,
            "async fn f(&self, id: u64) -> Result<(), E> { Ok(()) }",
        );
        assert!(!out.contains("diagnostic"), "{out}");
        assert!(
            out.contains("use :: idem_runtime :: __private :: StoreDeref as _ ;"),
            "{out}"
        );
    }

    #[test]
    fn only_an_unscoped_fn_without_self_or_generics_gets_the_module_item_check() {
        const CHECK: &str = "fns_in_impls_and_traits_need_an_explicit_scope";
        let free = expand_str(
            r#"key = "id""#,
            "async fn run(id: u64) -> Result<(), E> { Ok(()) }",
        );
        assert!(free.contains(CHECK), "{free}");
        // Also next to an error, so a second mistake does not hide it.
        let failed = expand_str(
            r#"key = "nope""#,
            "async fn run(id: u64) -> Result<(), E> { Ok(()) }",
        );
        assert!(
            failed.contains(CHECK) && failed.contains("compile_error"),
            "{failed}"
        );
        for (args, item) in [
            (
                r#"key = "id", scope = "jobs.run""#,
                "async fn run(id: u64) -> Result<(), E> { Ok(()) }",
            ),
            // These have errors of their own, which say more.
            (
                r#"key = "id""#,
                "async fn run(&self, id: u64) -> Result<(), E> { Ok(()) }",
            ),
            (
                r#"key = "id""#,
                "async fn run<T>(id: u64, t: T) -> Result<(), E> { Ok(()) }",
            ),
        ] {
            let out = expand_str(args, item);
            assert!(!out.contains(CHECK), "{out}");
        }
    }

    #[test]
    fn an_async_trait_method_is_wrapped_inside_its_box() {
        let out = expand_str(
            r#"key = "id", store = "self.idem", scope = "s""#,
            "fn m<'life0, 'async_trait>(&'life0 self, id: u64) -> ::core::pin::Pin<Box<dyn ::core::future::Future<Output = Result<u64, E>> + ::core::marker::Send + 'async_trait>> where 'life0: 'async_trait, Self: 'async_trait { Box::pin(async move { let __self = self; let __ret: Result<u64, E> = { Ok(id) }; __ret }) }",
        );
        assert!(!out.contains("compile_error"), "{out}");
        // The signature stays async-trait's; the wrapper runs in the boxed block, around
        // async-trait's own statements.
        assert!(out.contains("'async_trait > > where"), "{out}");
        let boxed = out.find("Box :: pin (async move {").expect(&out);
        let run = out.find("run_future").expect(&out);
        let rebinding = out.find("let __self = self").expect(&out);
        assert!(boxed < run && run < rebinding, "{out}");
        assert!(
            out.contains("let __idem_out : Result < u64 , E > ="),
            "{out}"
        );
    }
}
