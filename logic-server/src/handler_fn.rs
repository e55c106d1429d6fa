//! Handlers as plain async functions: [`handler!`](crate::handler) registers one.
//!
//! ```
//! use keelson_logic_server::{Context, Error, Json};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Add { by: i64 }
//!
//! #[derive(Serialize)]
//! struct Total { value: i64 }
//!
//! /// 401 when anonymous, 400 on a bad body, else the new total.
//! async fn add(cx: Context, Json(add): Json<Add>) -> Result<Json<Total>, Error> {
//!     let value = cx.increment("total", add.by).await?;
//!     Ok(Json(Total { value }))
//! }
//!
//! keelson_logic_server::handler!("doc.add", "adds `by` to the user's total", add);
//! ```
//!
//! The arguments are [extractors](crate::extract); the return value is anything
//! [`IntoReply`]: [`Json<T>`](crate::Json) (200), a [`Response`] (any success status,
//! headers), `()` (204), or a `Result` of one of these and an error that converts
//! into [`Error`] (a [`HandlerError`] keeps its status; any other error is a 500 with
//! its cause logged).

use crate::error::Error;
use crate::extract::{FromRequest, Json, extract};
use crate::handler::{Handler, HandlerError, RequestCtx, Response};
use crate::resource::PluginDecl;
use async_trait::async_trait;
use serde::Serialize;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

/// What a handler function may return.
pub trait IntoReply {
    /// The answer, or the failure to answer with.
    fn into_reply(self) -> Result<Response, HandlerError>;
}

impl IntoReply for Response {
    fn into_reply(self) -> Result<Response, HandlerError> {
        Ok(self)
    }
}

impl<T: Serialize> IntoReply for Json<T> {
    fn into_reply(self) -> Result<Response, HandlerError> {
        Response::json(&self.0)
    }
}

/// 204 No Content.
impl IntoReply for () {
    fn into_reply(self) -> Result<Response, HandlerError> {
        Ok(Response::no_content())
    }
}

impl<T: IntoReply, E: Into<Error>> IntoReply for Result<T, E> {
    fn into_reply(self) -> Result<Response, HandlerError> {
        self.map_err(|e| e.into().into_handler_error())?
            .into_reply()
    }
}

/// A function usable as a handler: `Args` are its extractors, as a tuple.
pub trait IntoHandler<Args>: Sized + Send + Sync + 'static {
    /// The handler the server calls.
    fn into_handler(self) -> Arc<dyn Handler>;
    /// The plugins its extractors need.
    fn plugins() -> Vec<PluginDecl>;
}

/// A handler function with its extractors.
struct FnHandler<F, Args> {
    f: F,
    _args: PhantomData<fn() -> Args>,
}

macro_rules! fn_handler {
    ($($a:ident),*) => {
        #[allow(non_snake_case, unused_mut, unused_variables)]
        #[async_trait]
        impl<F, Fut, R, $($a,)*> Handler for FnHandler<F, ($($a,)*)>
        where
            F: Fn($($a),*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = R> + Send,
            R: IntoReply,
            $($a: FromRequest,)*
        {
            async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
                let mut worst = None;
                $(let $a = extract::<$a>(&req, &mut worst);)*
                if let Some(e) = worst {
                    return Err(e);
                }
                #[allow(irrefutable_let_patterns)]
                let ($(Some($a),)*) = ($($a,)*) else {
                    return Err(HandlerError::internal("an extractor failed without saying why"));
                };
                // The extractors took what they need; the body goes now.
                drop(req);
                (self.f)($($a),*).await.into_reply()
            }
        }

        #[allow(non_snake_case)]
        impl<F, Fut, R, $($a,)*> IntoHandler<($($a,)*)> for F
        where
            F: Fn($($a),*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = R> + Send,
            R: IntoReply,
            $($a: FromRequest,)*
        {
            fn into_handler(self) -> Arc<dyn Handler> {
                Arc::new(FnHandler::<F, ($($a,)*)> { f: self, _args: PhantomData })
            }

            #[allow(unused_mut)]
            fn plugins() -> Vec<PluginDecl> {
                let mut out = Vec::new();
                $($a::plugins(&mut out);)*
                out
            }
        }
    };
}

fn_handler!();
fn_handler!(A1);
fn_handler!(A1, A2);
fn_handler!(A1, A2, A3);
fn_handler!(A1, A2, A3, A4);
fn_handler!(A1, A2, A3, A4, A5);
fn_handler!(A1, A2, A3, A4, A5, A6);
fn_handler!(A1, A2, A3, A4, A5, A6, A7);
fn_handler!(A1, A2, A3, A4, A5, A6, A7, A8);

/// `f` as a handler (used by [`handler!`](crate::handler)).
#[doc(hidden)]
pub fn into_handler<Args, F: IntoHandler<Args>>(f: F) -> Arc<dyn Handler> {
    f.into_handler()
}

/// The plugins `f`'s extractors need (used by [`handler!`](crate::handler)).
#[doc(hidden)]
pub fn plugins_of<Args, F: IntoHandler<Args>>(_f: &F) -> Vec<PluginDecl> {
    F::plugins()
}

/// Register the async function `$f` as the handler `$name` (what `POST
/// /api/{name}` calls and `logic_server.handlers` enables), with a one-line
/// description for operators. Its arguments are [extractors](crate::extract),
/// its result anything [`IntoReply`]. The registration is collected at link time:
/// nothing else is needed.
#[macro_export]
macro_rules! handler {
    ($name:expr, $description:expr, $f:expr $(,)?) => {
        $crate::inventory::submit! {
            $crate::HandlerPlugin {
                name: $name,
                description: $description,
                build: |settings| {
                    settings.refuse_any()?;
                    Ok($crate::handler_fn::into_handler($f))
                },
                plugins: || $crate::handler_fn::plugins_of(&$f),
            }
        }
    };
}
