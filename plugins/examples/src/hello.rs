//! `hello`: the handler of the README's "Writing a handler plugin", verbatim.

use keelson_logic_server::{Context, HandlerError, Json};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Greet {
    name: String,
}

#[derive(Serialize)]
struct Greeting {
    text: String,
    visits: i64,
}

/// 401 when anonymous, 400 on a bad body, else a greeting and the visit count.
async fn hello(cx: Context, Json(greet): Json<Greet>) -> Result<Json<Greeting>, HandlerError> {
    let visits = cx.increment("visits", 1).await?;
    Ok(Json(Greeting {
        text: format!("hello, {}", greet.name),
        visits,
    }))
}

keelson_logic_server::handler!("hello", "greets and counts visits", hello);
