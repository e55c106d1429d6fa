//! `keelson new DIR`: a new application, a cargo package of its own that depends on
//! Keelson by path and whose binary is `keelson::main()` with its handlers linked.
//!
//! The files are the templates in `src/scaffold/`, with `{{name}}` and
//! `{{keelson_path}}` filled in. Everything is checked before the first file is
//! written, so a refused `keelson new` leaves nothing behind.

use std::fmt;
use std::path::PathBuf;

/// `keelson new`: create a Keelson application.
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// Directory of the application; created if missing, refused unless empty.
    pub dir: PathBuf,
    /// Package name; default DIR's file name.
    #[arg(long)]
    pub name: Option<String>,
    /// The Keelson checkout to depend on; default the one this binary was built from.
    #[arg(long, value_name = "PATH", default_value = env!("CARGO_MANIFEST_DIR"))]
    pub keelson_path: PathBuf,
}

/// Why `keelson new` wrote nothing, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScaffoldError {
    /// The directory holds files already.
    #[error("{} already exists and is not empty; choose a new or an empty directory", .0.display())]
    NotEmpty(PathBuf),
    /// The directory is a file.
    #[error("{} exists and is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// No package name can be taken from the directory.
    #[error("cannot take a package name from {}; pass --name NAME", .0.display())]
    NoName(PathBuf),
    /// The package name is not one cargo accepts.
    #[error("`{name}` cannot be the package name: {reason}{hint}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
        /// How to choose another (empty when `--name` was given).
        hint: String,
    },
    /// `--keelson-path` is not a Keelson checkout.
    #[error(
        "{} is not a Keelson checkout (it has no Cargo.toml); pass --keelson-path with the directory of Keelson's Cargo.toml",
        .0.display()
    )]
    NotKeelson(PathBuf),
    /// A path the files would hold is not UTF-8.
    #[error("{}: a path that is not UTF-8 cannot be written in Cargo.toml", .0.display())]
    NotUtf8(PathBuf),
    /// Reading or writing a file failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// To which file.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// What [`create`] wrote.
#[derive(Debug)]
pub struct Created {
    /// The directory, as given.
    pub dir: PathBuf,
    /// The package name.
    pub name: String,
    /// The Keelson checkout the package depends on (absolute).
    pub keelson_path: PathBuf,
    /// The files written, relative to `dir`.
    pub files: Vec<&'static str>,
}

const CARGO_TOML: &str = include_str!("scaffold/Cargo.toml.tmpl");
const MAIN_RS: &str = include_str!("scaffold/main.rs.tmpl");
const KEELSON_TOML: &str = include_str!("scaffold/keelson.toml.tmpl");
const README_MD: &str = include_str!("scaffold/README.md.tmpl");
const GITIGNORE: &str = include_str!("scaffold/gitignore.tmpl");

/// Names cargo refuses for a package, or that would clash with what the package
/// builds or depends on (a package `serde` cannot depend on serde).
const RESERVED: &[&str] = &[
    "keelson",
    "serde",
    "serde_json",
    "tokio",
    "std",
    "core",
    "alloc",
    "proc_macro",
    "test",
    "build",
    "deps",
    "examples",
    "incremental",
];

/// Rust's keywords, which cargo refuses as package names.
const KEYWORDS: &[&str] = &[
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
    "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
    "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
    "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// Create the application `args` describe, after checking that the name is valid,
/// that the directory is new or empty and that the Keelson checkout exists.
pub fn create(args: &NewArgs) -> Result<Created, ScaffoldError> {
    let dir = &args.dir;
    let absolute = std::path::absolute(dir).map_err(|source| ScaffoldError::Io {
        action: "resolve",
        path: dir.clone(),
        source,
    })?;
    if absolute.exists() {
        if !absolute.is_dir() {
            return Err(ScaffoldError::NotADirectory(dir.clone()));
        }
        let mut entries = std::fs::read_dir(&absolute).map_err(|source| ScaffoldError::Io {
            action: "read the directory",
            path: dir.clone(),
            source,
        })?;
        if entries.next().is_some() {
            return Err(ScaffoldError::NotEmpty(dir.clone()));
        }
    }
    let name = match &args.name {
        Some(name) => {
            validate_name(name).map_err(|reason| ScaffoldError::InvalidName {
                name: name.clone(),
                reason,
                hint: String::new(),
            })?;
            name.clone()
        }
        None => {
            // `foo/.` and `..` name the directory they resolve to.
            let resolved = absolute.canonicalize().unwrap_or_else(|_| absolute.clone());
            let name = resolved
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| ScaffoldError::NoName(dir.clone()))?
                .to_owned();
            validate_name(&name).map_err(|reason| ScaffoldError::InvalidName {
                name: name.clone(),
                reason,
                hint: " (taken from the directory's name; pass --name NAME)".to_owned(),
            })?;
            name
        }
    };
    let keelson_path = args
        .keelson_path
        .canonicalize()
        .ok()
        .filter(|p| p.join("Cargo.toml").is_file())
        .ok_or_else(|| ScaffoldError::NotKeelson(args.keelson_path.clone()))?;
    let keelson_path_str = keelson_path
        .to_str()
        .ok_or_else(|| ScaffoldError::NotUtf8(keelson_path.clone()))?;
    // Keelson's own lock file is the application's first one, so that it builds the
    // dependency versions Keelson was tested with; cargo adds the application's own
    // entries (and drops what it does not use) on the first build.
    let lock_path = keelson_path.join("Cargo.lock");
    let lock = match std::fs::read_to_string(&lock_path) {
        Ok(lock) => Some(lock),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(ScaffoldError::Io {
                action: "read",
                path: lock_path,
                source,
            });
        }
    };

    let fill = |template: &str| {
        template
            .replace("{{name}}", &name)
            .replace("{{keelson_path}}", &toml_string(keelson_path_str))
    };
    let mut files: Vec<(&'static str, String)> = vec![
        ("Cargo.toml", fill(CARGO_TOML)),
        ("src/main.rs", fill(MAIN_RS)),
        ("keelson.toml", fill(KEELSON_TOML)),
        ("README.md", fill(README_MD)),
        (".gitignore", fill(GITIGNORE)),
    ];
    if let Some(lock) = lock {
        files.push(("Cargo.lock", lock));
    }
    for (file, contents) in &files {
        let path = absolute.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ScaffoldError::Io {
                action: "create the directory",
                path: parent.to_owned(),
                source,
            })?;
        }
        std::fs::write(&path, contents).map_err(|source| ScaffoldError::Io {
            action: "write",
            path,
            source,
        })?;
    }
    Ok(Created {
        dir: dir.clone(),
        name,
        keelson_path,
        files: files.into_iter().map(|(file, _)| file).collect(),
    })
}

impl fmt::Display for Created {
    /// What was created, and the next commands.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Created the Keelson application `{}` in {}:",
            self.name,
            self.dir.display()
        )?;
        for file in &self.files {
            let note = match *file {
                "Cargo.toml" => format!(
                    "the package; depends on keelson at {}",
                    self.keelson_path.display()
                ),
                "Cargo.lock" => {
                    "Keelson's lock file: the dependency versions it was tested with".to_owned()
                }
                "src/main.rs" => "the `hello` handler, its test, and main".to_owned(),
                "keelson.toml" => "the configuration `cargo run` loads".to_owned(),
                "README.md" => "how to run, test and add handlers".to_owned(),
                _ => String::new(),
            };
            if note.is_empty() {
                writeln!(f, "  {file}")?;
            } else {
                writeln!(f, "  {file:14} {note}")?;
            }
        }
        let dir = shell_word(&self.dir.to_string_lossy());
        writeln!(f)?;
        writeln!(f, "Next:")?;
        writeln!(f, "  cd {dir} && cargo run")?;
        writeln!(
            f,
            "and in another terminal: curl -s -XPOST localhost:8080/api/hello -d '{{\"name\":\"Ada\"}}'"
        )?;
        write!(
            f,
            "`cargo test` runs the handler's test; `cargo run -- --help` lists the subcommands."
        )
    }
}

/// Whether cargo accepts `name` as this package's name; the reason when not.
fn validate_name(name: &str) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("it is empty".to_owned());
    };
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "`{bad}` is not allowed; use ASCII letters, digits, `-` and `_`"
        ));
    }
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err("it must start with a letter or `_`".to_owned());
    }
    if KEYWORDS.contains(&name) {
        return Err("it is a Rust keyword".to_owned());
    }
    if RESERVED.contains(&name.replace('-', "_").to_ascii_lowercase().as_str()) {
        return Err(
            "it is reserved (Rust's own crates, cargo's directories, or a dependency of the application)"
                .to_owned(),
        );
    }
    Ok(())
}

/// `s` as a TOML basic string, quotes included.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `s` as one word for a POSIX shell: unchanged when it is plain, else in single
/// quotes.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn names_cargo_accepts_pass_and_others_say_why() {
        for ok in ["shop", "my-app", "my_app2", "_private", "Shop"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("2fast", "start with a letter"),
            ("-x", "start with a letter"),
            ("my app", "` ` is not allowed"),
            ("my.app", "`.` is not allowed"),
            ("fn", "keyword"),
            ("keelson", "reserved"),
            ("serde-json", "reserved"),
            ("test", "reserved"),
        ] {
            let err = validate_name(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn a_path_becomes_a_toml_string_that_reads_back_the_same() {
        for path in ["/home/ada/keelson", r#"/odd "quoted" \dir"#, "/tab\there"] {
            let table: toml::Table =
                toml::from_str(&format!("path = {}", toml_string(path))).unwrap();
            assert_eq!(table["path"].as_str(), Some(path));
        }
    }

    #[test]
    fn every_placeholder_is_filled() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("shop");
        let created = create(&NewArgs {
            dir: dir.clone(),
            name: None,
            keelson_path: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        })
        .unwrap();
        assert_eq!(created.name, "shop");
        for file in &created.files {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(!text.contains("{{"), "{file} keeps a placeholder:\n{text}");
        }
    }

    #[test]
    fn the_directory_is_quoted_for_the_shell_only_when_it_must() {
        assert_eq!(shell_word("apps/shop"), "apps/shop");
        assert_eq!(shell_word("my apps/shop"), "'my apps/shop'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}
