//! Example handler plugins: what a handler author writes.
//!
//! * `echo`: answers with its body, unchanged;
//! * `counter.increment` / `counter.get`: a per-user counter in the user's context;
//! * `cart.add` / `cart.list` / `cart.clear`: a per-user shopping cart;
//! * `shop.prices` / `shop.checkout`: a plugin resource (a price list from the
//!   settings) and handler-to-handler calls (checkout reads and empties the cart);
//! * `hello`: the example of the README.
//!
//! Linking this crate makes the handlers available; the configuration's
//! `logic_server.handlers` list enables them.

mod cart;
mod counter;
mod echo;
mod hello;
mod report;
pub mod shop;
