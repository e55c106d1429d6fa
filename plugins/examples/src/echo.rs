//! `echo`: the smallest possible handler.

use keelson_logic_server::{Body, Response};

async fn echo(Body(body): Body) -> Response {
    Response::raw_json(body)
}

keelson_logic_server::handler!("echo", "answers with its JSON body, unchanged", echo);
