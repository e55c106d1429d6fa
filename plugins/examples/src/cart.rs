//! `cart.add`, `cart.list`, `cart.clear`: a per-user shopping cart.
//!
//! The cart is one context value (a map of item to quantity) read, changed and
//! written back, so of two `cart.add` of one user that run at the same instant the
//! later write wins. That is the usual trade-off of a session cart; a counter is the
//! tool for values that must never lose an update.

use keelson_logic_server::{Handler, HandlerError, RequestCtx, Response, async_trait};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const KEY: &str = "cart";

type Cart = BTreeMap<String, u32>;

#[derive(Debug, Serialize)]
struct CartView<'a> {
    items: Vec<Line<'a>>,
}

#[derive(Debug, Serialize)]
struct Line<'a> {
    item: &'a str,
    quantity: u32,
}

fn view(cart: &Cart) -> Result<Response, HandlerError> {
    Response::json(&CartView {
        items: cart
            .iter()
            .map(|(item, quantity)| Line {
                item,
                quantity: *quantity,
            })
            .collect(),
    })
}

/// Body of `cart.add`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    item: String,
    #[serde(default = "one")]
    quantity: u32,
}

fn one() -> u32 {
    1
}

/// Settings of `cart.add`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AddSettings {
    /// Most distinct items in one cart.
    max_items: usize,
}

impl Default for AddSettings {
    fn default() -> Self {
        Self { max_items: 100 }
    }
}

struct AddHandler {
    max_items: usize,
}

#[async_trait]
impl Handler for AddHandler {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let context = req.context()?;
        let add: Add = req.json()?;
        if add.item.is_empty() || add.item.len() > 200 {
            return Err(HandlerError::bad_request("`item` must be 1 to 200 bytes"));
        }
        if add.quantity == 0 {
            return Err(HandlerError::bad_request("`quantity` must be at least 1"));
        }
        let mut cart: Cart = context.get(KEY).await?.unwrap_or_default();
        if !cart.contains_key(&add.item) && cart.len() >= self.max_items {
            return Err(HandlerError::Conflict(format!(
                "the cart already holds {} distinct items",
                self.max_items
            )));
        }
        let quantity = cart.entry(add.item).or_insert(0);
        *quantity = quantity.saturating_add(add.quantity);
        context.set(KEY, &cart).await?;
        view(&cart)
    }
}

struct ListHandler;

#[async_trait]
impl Handler for ListHandler {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let cart: Cart = req.context()?.get(KEY).await?.unwrap_or_default();
        view(&cart)
    }
}

struct ClearHandler;

#[async_trait]
impl Handler for ClearHandler {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        req.context()?.delete(KEY).await?;
        view(&Cart::new())
    }
}

keelson_logic_server::register_handler!(
    "cart.add",
    "adds {\"item\", \"quantity\"} to the user's cart and answers the cart",
    |settings| {
        let s: AddSettings = settings.parse()?;
        Ok(AddHandler {
            max_items: s.max_items,
        })
    }
);
keelson_logic_server::register_handler!("cart.list", "answers the user's cart", |_| Ok(
    ListHandler
));
keelson_logic_server::register_handler!("cart.clear", "empties the user's cart", |_| Ok(
    ClearHandler
));
