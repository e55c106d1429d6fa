//! `keelson handlers`: the handlers linked into this binary, which of them the
//! configuration enables, and the ones it names that no linked plugin offers (a
//! logic server would refuse to start with those).

use std::fmt::Write as _;

/// One linked handler.
#[derive(Debug, Clone, Copy)]
pub struct Linked<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its one-line description.
    pub description: &'a str,
}

/// The listing, for `origin` (the configuration file as messages name it).
#[derive(Debug)]
pub struct Listing {
    /// What `keelson handlers` prints.
    pub text: String,
    /// Handlers the configuration enables that no linked plugin offers.
    pub missing: Vec<String>,
}

/// Mark each of `linked` that `enabled` names with `*`, and list the names of
/// `enabled` that none of `linked` offers, each marked `!`.
pub fn render(linked: &[Linked<'_>], enabled: &[String], origin: &str) -> Listing {
    let missing: Vec<String> = enabled
        .iter()
        .filter(|name| !linked.iter().any(|h| h.name == name.as_str()))
        .cloned()
        .collect();
    let width = linked
        .iter()
        .map(|h| h.name.len())
        .chain(missing.iter().map(String::len))
        .max()
        .unwrap_or(0);
    let mut text = format!(
        "Handlers linked into this binary; * = enabled by logic_server.handlers of {origin}\n"
    );
    if linked.is_empty() {
        text.push_str("  (none)\n");
    }
    for handler in linked {
        let mark = if enabled.iter().any(|e| e == handler.name) {
            '*'
        } else {
            ' '
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "{mark} {:width$}  {}",
            handler.name, handler.description
        );
    }
    if !missing.is_empty() {
        let _ = writeln!(
            text,
            "\nMissing: enabled by {origin} but offered by no linked plugin (a logic server would refuse to start)"
        );
        for name in &missing {
            let _ = writeln!(text, "! {name}");
        }
    }
    Listing { text, missing }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINKED: &[Linked<'static>] = &[
        Linked {
            name: "cart.add",
            description: "adds to the cart",
        },
        Linked {
            name: "echo",
            description: "answers its body",
        },
    ];

    #[test]
    fn enabled_handlers_are_marked_and_missing_ones_listed() {
        let enabled = vec!["echo".to_owned(), "nope".to_owned()];
        let listing = render(LINKED, &enabled, "app.toml");
        assert_eq!(
            listing.text,
            "Handlers linked into this binary; * = enabled by logic_server.handlers of app.toml\n\
             \x20 cart.add  adds to the cart\n\
             * echo      answers its body\n\
             \n\
             Missing: enabled by app.toml but offered by no linked plugin (a logic server would refuse to start)\n\
             ! nope\n"
        );
        assert_eq!(listing.missing, ["nope"]);
    }

    #[test]
    fn nothing_missing_means_no_missing_section() {
        let listing = render(LINKED, &["cart.add".to_owned()], "app.toml");
        assert!(!listing.text.contains("Missing"), "{}", listing.text);
        assert!(listing.missing.is_empty());
    }
}
