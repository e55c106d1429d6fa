//! `shop.prices` and `shop.checkout`: a plugin resource and a handler-to-handler
//! call.
//!
//! The price list is the `shop` plugin's resource, built once at start from
//! `[logic_server.plugins.shop] prices` and shared by both handlers. `shop.checkout`
//! reads the user's cart by calling `cart.list` (on whichever server hosts it, as
//! the same user, within the same deadline), prices it, empties it with
//! `cart.clear`, numbers the order, and answers 201 with it.
//! The calls come before this handler's own context write: a handler holds its
//! user's write turn from its first write to its reply, so a handler it calls after
//! that which writes the same user's context would wait for it.

use keelson_logic_server::{Caller, Context, Error, HandlerError, Json, Plugin, Res, Response};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The price list, in cents by item.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prices {
    prices: BTreeMap<String, u64>,
}

impl Plugin for Prices {
    const NAME: &'static str = "shop";
    type Settings = Self;
    async fn setup(settings: Self) -> Result<Self, Error> {
        if let Some((item, _)) = settings.prices.iter().find(|(_, cents)| **cents == 0) {
            return Err(Error::internal(format!("the price of `{item}` is 0")));
        }
        Ok(settings)
    }
}

/// A cart, as `cart.list` answers it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cart {
    /// Its lines.
    pub items: Vec<Line>,
}

/// One line of a cart.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Line {
    /// The item.
    pub item: String,
    /// How many.
    pub quantity: u32,
}

/// What `shop.checkout` answers.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Order {
    /// The user's order number, from 1.
    pub order: i64,
    /// The cart that was bought.
    pub items: Cart,
    /// What it costs, in cents.
    pub total_cents: u64,
}

async fn prices(prices: Res<Prices>) -> Json<BTreeMap<String, u64>> {
    Json(prices.prices.clone())
}

async fn checkout(
    cx: Context,
    calls: Caller,
    prices: Res<Prices>,
) -> Result<Response, HandlerError> {
    let cart: Cart = calls.call("cart.list", &()).await?;
    if cart.items.is_empty() {
        return Err(HandlerError::Conflict("the cart is empty".into()));
    }
    let mut total_cents = 0u64;
    for line in &cart.items {
        let Some(cents) = prices.prices.get(&line.item) else {
            return Err(HandlerError::Conflict(format!(
                "`{}` is not for sale",
                line.item
            )));
        };
        total_cents = total_cents.saturating_add(cents.saturating_mul(u64::from(line.quantity)));
    }
    let _: Cart = calls.call("cart.clear", &()).await?;
    let order = cx.increment("orders", 1).await?;
    Response::json(&Order {
        order,
        items: cart,
        total_cents,
    })?
    .with_status(201)
}

keelson_logic_server::handler!(
    "shop.prices",
    "answers the price list, in cents by item",
    prices
);
keelson_logic_server::handler!(
    "shop.checkout",
    "buys the user's cart: 201 with the order and its total",
    checkout
);
