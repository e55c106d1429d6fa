//! `cart.add`, `cart.list`, `cart.clear`: a per-user cart, one context value read,
//! changed and written back (of two `cart.add` at once the later wins: a session
//! cart's usual trade-off). Each answers `{"items": [{"item", "quantity"}, ...]}`.
//! Settings: `[logic_server.plugins.cart] max_items` (default 100).

use keelson_logic_server::{Context, HandlerError, Json, Res, handler, settings_plugin};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    item: String,
    quantity: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Limits {
    max_items: Option<usize>,
}
settings_plugin!(Limits, "cart");

type Cart = BTreeMap<String, u32>;
type Answer = Result<Json<Value>, HandlerError>;

fn view(cart: &Cart) -> Answer {
    let line = |(item, quantity): (&String, &u32)| json!({ "item": item, "quantity": quantity });
    let items: Vec<_> = cart.iter().map(line).collect();
    Ok(Json(json!({ "items": items })))
}

async fn add(cx: Context, Json(add): Json<Add>, limits: Res<Limits>) -> Answer {
    let quantity = add.quantity.unwrap_or(1);
    let max = limits.max_items.unwrap_or(100);
    if add.item.is_empty() || add.item.len() > 200 {
        return Err(HandlerError::bad_request("`item` must be 1 to 200 bytes"));
    }
    if quantity == 0 {
        return Err(HandlerError::bad_request("`quantity` must be at least 1"));
    }
    let mut cart: Cart = cx.get("cart").await?.unwrap_or_default();
    if !cart.contains_key(&add.item) && cart.len() >= max {
        let full = format!("the cart already holds {max} distinct items");
        return Err(HandlerError::Conflict(full));
    }
    let total = cart.entry(add.item).or_insert(0);
    *total = total.saturating_add(quantity);
    cx.set("cart", &cart).await?;
    view(&cart)
}

async fn list(cx: Context) -> Answer {
    view(&cx.get("cart").await?.unwrap_or_default())
}

async fn clear(cx: Context) -> Answer {
    cx.delete("cart").await?;
    view(&Cart::new())
}

handler!("cart.add", "adds {\"item\", \"quantity\"} to the cart", add);
handler!("cart.list", "answers the user's cart", list);
handler!("cart.clear", "empties the user's cart", clear);
