//! `hello`: the handler of the README's "Writing a handler plugin", verbatim.

use keelson_logic_server::{Handler, HandlerError, RequestCtx, Response, async_trait};
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

struct Hello;

#[async_trait]
impl Handler for Hello {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let greet: Greet = req.json()?; // 400 on a bad body
        let visits = req.context()?.increment("visits", 1).await?; // 401 when anonymous
        Response::json(&Greeting {
            text: format!("hello, {}", greet.name),
            visits,
        })
    }
}

keelson_logic_server::register_handler!("hello", "greets and counts visits", |_settings| Ok(Hello));
