//! A method of an `#[async_trait]` impl (or a default method of an `#[async_trait]` trait). The
//! impl's attribute expands first, so `#[idempotent]` is given what async-trait (0.1) made of
//!
//! ```text
//! async fn m(&self, id: u64) -> R { body }
//! ```
//!
//! that is
//!
//! ```text
//! fn m<'life0, 'async_trait>(&'life0 self, id: u64)
//!     -> Pin<Box<dyn Future<Output = R> + Send + 'async_trait>>
//! where 'life0: 'async_trait, Self: 'async_trait
//! { Box::pin(async move { let __self = self; let __ret: R = { body with `__self` }; __ret }) }
//! ```
//!
//! The wrapper goes inside that `async move` block, around what async-trait put there (its
//! rebinding of `self` and of the parameters, and the user's body): the output is `R`, and the
//! signature and the boxing stay async-trait's.

use syn::spanned::Spanned;
use syn::{
    Block, Expr, ExprCall, GenericArgument, ItemFn, PathArguments, ReturnType, Stmt, Type,
    TypeParamBound,
};

/// The parts of a method rewritten by async-trait.
pub(crate) struct Rewritten<'a> {
    /// `R`, the output of the boxed future: the handler's `Result`.
    pub(crate) output: &'a Type,
    /// `Box::pin(...)`, whose argument is replaced.
    pub(crate) call: &'a ExprCall,
    /// The `async` keyword of the boxed block (async-trait spans it at the user's `async`).
    pub(crate) async_span: proc_macro2::Span,
    /// The block inside `async move`.
    pub(crate) block: &'a Block,
}

/// `None` when async-trait did not rewrite `func` (it names no `'async_trait` lifetime); an error
/// when it did, in a shape this version does not know.
pub(crate) fn rewritten(func: &ItemFn) -> Option<syn::Result<Rewritten<'_>>> {
    let sig = &func.sig;
    if sig.asyncness.is_some()
        || !sig
            .generics
            .lifetimes()
            .any(|l| l.lifetime.ident == "async_trait")
    {
        return None;
    }
    let parts = boxed_output(&sig.output).and_then(|output| {
        let (call, async_span, block) = boxed_block(&func.block)?;
        Some(Rewritten {
            output,
            call,
            async_span,
            block,
        })
    });
    Some(parts.ok_or_else(|| {
        syn::Error::new(
            sig.fn_token.span(),
            format!(
                "#[idempotent] does not know this shape of `#[async_trait]` method (it knows async-trait 0.1's `Pin<Box<dyn Future<Output = R>>>` returning `Box::pin(async move {{ .. }})`): put #[idempotent] on an inherent `async fn` and call it from `{}`, or use a native `async fn` in the trait",
                sig.ident
            ),
        )
    }))
}

/// `R` in `Pin<Box<dyn Future<Output = R> + ..>>`.
fn boxed_output(output: &ReturnType) -> Option<&Type> {
    let ReturnType::Type(_, ty) = output else {
        return None;
    };
    let Type::TraitObject(object) = only_argument(only_argument(ty, "Pin")?, "Box")? else {
        return None;
    };
    object.bounds.iter().find_map(|bound| {
        let TypeParamBound::Trait(t) = bound else {
            return None;
        };
        let last = t.path.segments.last()?;
        let PathArguments::AngleBracketed(args) = &last.arguments else {
            return None;
        };
        if last.ident != "Future" {
            return None;
        }
        args.args.iter().find_map(|a| match a {
            GenericArgument::AssocType(assoc) if assoc.ident == "Output" => Some(&assoc.ty),
            _ => None,
        })
    })
}

/// The one type argument of a path type whose last segment is `name`.
fn only_argument<'a>(ty: &'a Type, name: &str) -> Option<&'a Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match (last.ident == name, args.args.len(), args.args.first()) {
        (true, 1, Some(GenericArgument::Type(t))) => Some(t),
        _ => None,
    }
}

/// The body `Box::pin(async move { .. })`, alone in the fn's block.
fn boxed_block(block: &Block) -> Option<(&ExprCall, proc_macro2::Span, &Block)> {
    let [Stmt::Expr(Expr::Call(call), None)] = block.stmts.as_slice() else {
        return None;
    };
    let Expr::Path(func) = &*call.func else {
        return None;
    };
    let [Expr::Async(inner)] = call.args.iter().collect::<Vec<_>>().as_slice() else {
        return None;
    };
    let pin = func.path.segments.last()?.ident == "pin";
    (pin && inner.capture.is_some()).then_some((call, inner.async_token.span, &inner.block))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(text: &str) -> ItemFn {
        syn::parse_str(text).unwrap()
    }

    #[test]
    fn the_shape_async_trait_gives_is_recognised() {
        let f = item(
            "fn m<'life0, 'async_trait>(&'life0 self, id: u64) -> ::core::pin::Pin<Box<dyn ::core::future::Future<Output = Result<u64, E>> + ::core::marker::Send + 'async_trait>> where 'life0: 'async_trait, Self: 'async_trait { Box::pin(async move { let __self = self; let __ret: Result<u64, E> = { Ok(id) }; __ret }) }",
        );
        let parts = rewritten(&f).unwrap().unwrap();
        let output = parts.output;
        assert_eq!(quote::quote!(#output).to_string(), "Result < u64 , E >");
        assert_eq!(parts.block.stmts.len(), 3);
    }

    #[test]
    fn other_fns_are_not_async_trait_methods() {
        // A fn that returns a boxed future by hand is not taken for async-trait's.
        let f = item(
            "fn m<'a>(&'a self) -> Pin<Box<dyn Future<Output = Result<u64, E>> + Send + 'a>> { Box::pin(async move { Ok(1) }) }",
        );
        assert!(rewritten(&f).is_none());
        assert!(rewritten(&item("async fn m(&self) -> Result<u64, E> { Ok(1) }")).is_none());
    }

    #[test]
    fn an_unknown_shape_is_an_error_that_says_what_to_do() {
        let f = item(
            "fn m<'async_trait>(&self) -> Pin<Box<dyn Future<Output = R> + 'async_trait>> { let x = 1; Box::pin(async move { x }) }",
        );
        let err = rewritten(&f).unwrap().err().unwrap().to_string();
        assert!(err.contains("inherent `async fn`"), "{err}");
    }
}
