//! The client API against a consumer on the in-memory transport.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_protocol::client::{CallError, Client};
use keelson_protocol::transport::memory::MemoryTransport;
use keelson_protocol::transport::{RequestError, ServiceSpec};
use keelson_protocol::{Reply, ReplyStatus, Request, Transport, decode, encode};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn a_call_carries_handler_user_body_and_deadline_and_returns_the_reply() {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    transport
        .declare_service(&ServiceSpec {
            name: "s".into(),
            routes: vec!["who".into()],
        })
        .await
        .unwrap();
    let mut consumer = transport.consume("s", 4).await.unwrap();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let req: Request = decode(&d.payload).unwrap();
            let body = format!(
                r#"{{"handler":"{}","user":"{}","body":{}}}"#,
                req.handler,
                req.user.unwrap_or_default(),
                String::from_utf8(req.body).unwrap()
            );
            let reply = Reply::ok(req.id, body.into_bytes(), "node-x");
            d.reply(encode(&reply).unwrap()).await.unwrap();
            d.ack().await.unwrap();
        }
    });
    let client = Client::new(transport.clone());
    let reply = client
        .call(
            "who",
            b"[1]".to_vec(),
            Some("alice".into()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, ReplyStatus::Ok);
    assert_eq!(reply.served_by, "node-x");
    assert_eq!(
        reply.body,
        br#"{"handler":"who","user":"alice","body":[1]}"#.to_vec()
    );

    let err = client
        .call("nobody", b"1".to_vec(), None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::Request(RequestError::Unroutable(_))),
        "{err:?}"
    );
}
