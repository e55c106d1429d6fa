//! `echo`: the smallest possible handler.

use keelson_logic_server::{Handler, HandlerError, RequestCtx, Response, async_trait};

struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        Ok(Response::raw_json(req.body().clone()))
    }
}

keelson_logic_server::register_handler!("echo", "answers with its JSON body, unchanged", |_| Ok(
    Echo
));
