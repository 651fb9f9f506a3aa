//! `serve --config FILE`: the daemon's settings from a TOML file.
//!
//! The file is flat: its top-level keys are `serve`'s long flags without the
//! dashes in front (`sock`, `workdir`, `cache-size`, …), with the same value
//! syntax (sizes as `"512M"` or a number of bytes, the socket mode as the
//! string `"0660"`), and a repeatable flag takes an array
//! (`allow-uid = [1000, 1001]`). Paths mean what they would on the command
//! line: relative ones are relative to the current directory, not to the
//! file. The schema is [`ServeOptions`] itself, so every flag is a key and
//! nothing else is.
//!
//! Anything wrong (unreadable file, bad TOML, unknown key, bad value) is one
//! line naming the file, the line and the key: `FILE:LINE: KEY: what`.

use crate::cli::args::ServeOptions;
use crate::cli::Fail;
use std::path::Path;

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<ServeOptions, Fail> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Fail(format!("--config {}: {e}", path.display())))?;
    parse(&text).map_err(|e| Fail(format!("{}:{e}", path.display())))
}

/// Parses a config file's text; the error is `LINE: KEY: what`.
pub fn parse(text: &str) -> Result<ServeOptions, String> {
    toml::from_str(text).map_err(|e| describe(text, &e))
}

/// One line for a TOML or schema error: where, which key, what.
fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = one_line(e.message());
    let Some(span) = e.span() else {
        return format!(" {message}");
    };
    let at = span.start.min(text.len());
    let line = text[..at].matches('\n').count() + 1;
    if let Some(key) = unknown_key(&message) {
        return format!(
            "{line}: {key}: unknown key (the keys are serve's long options, see serve --help)"
        );
    }
    match key_at(text, at) {
        Some(key) => format!("{line}: {key}: {message}"),
        None => format!("{line}: {message}"),
    }
}

/// Serde's message for an unknown field names it between backquotes.
fn unknown_key(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(key, _)| key)
}

/// The top-level key whose value holds byte `at`: the nearest `key =` at or
/// above that line (a value may span lines, as an array does).
fn key_at(text: &str, at: usize) -> Option<String> {
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    text[..line_end].lines().rev().find_map(|l| {
        let (key, _) = l.split_once('=')?;
        let key = key.trim().trim_matches('"');
        let bare = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        bare.then(|| key.to_string())
    })
}

/// Serde and toml messages may hold newlines; the error is one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::size::Size;

    const EXAMPLE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/blobmgr.toml"
    ));

    #[test]
    fn the_shipped_example_loads() {
        let c = parse(EXAMPLE).expect("examples/blobmgr.toml");
        assert_eq!(
            c.sock.as_deref(),
            Some(Path::new("/run/blobmgr/blobmgr.sock"))
        );
        assert_eq!(c.cache_size, Some(Size(10 << 30)));
        assert_eq!(c.granule, Some(Size(1 << 20)));
        assert!(!c.allow_uid.is_empty());
    }

    #[test]
    fn every_key_is_a_long_flag() {
        let c = parse(
            "sock = \"s\"\nworkdir = \"w\"\nbackend = \"b\"\nworkers = 2\nmax-conns = 9\n\
             granule = \"64K\"\ncache-size = 1048576\nsock-mode = \"0660\"\n\
             sock-group = 100\nallow-uid = [1000, 1001]\nbackend-timeout = 2.5\n\
             backend-retries = 1\nregistry-user = \"u\"\nregistry-password-file = \"p\"\n\
             metrics = [\"127.0.0.1:9100\", \"unix:/run/m.sock\"]\n",
        )
        .unwrap();
        assert_eq!(c.workers, Some(2));
        assert_eq!(c.granule, Some(Size(65536)));
        assert_eq!(c.cache_size, Some(Size(1 << 20)));
        assert_eq!(c.sock_mode.map(|m| m.0), Some(0o660));
        assert_eq!(c.sock_group.map(|g| g.0), Some("100".into()));
        assert_eq!(c.allow_uid, vec![1000, 1001]);
        assert_eq!(c.backend_timeout.map(|s| s.0), Some(2.5));
        assert_eq!(c.metrics.len(), 2);
        // Integers are accepted where a float is meant.
        assert_eq!(
            parse("backend-timeout = 3")
                .unwrap()
                .backend_timeout
                .map(|s| s.0),
            Some(3.0)
        );
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let cases = [
            ("sock = \"s\"\nsokc = \"x\"\n", "2: sokc: unknown key"),
            (
                "sock = \"s\"\n\ncache-size = \"12Q\"\n",
                "3: cache-size: \"12Q\" is not a size",
            ),
            ("workers = \"four\"\n", "1: workers: invalid type"),
            ("sock-mode = 660\n", "1: sock-mode: invalid type"),
            (
                "sock-mode = \"999\"\n",
                "1: sock-mode: \"999\" is not an octal mode",
            ),
            (
                "allow-uid = [\n  1000,\n  \"x\",\n]\n",
                "3: allow-uid: invalid type",
            ),
            (
                "backend-timeout = 0\n",
                "1: backend-timeout: 0 is not a positive",
            ),
            ("sock = \"s\"\nworkdir = \n", "2: "),
            ("config = \"other.toml\"\n", "1: config: unknown key"),
            ("[serve]\nsock = \"s\"\n", "1: serve: unknown key"),
            (
                "metrics = [\"nowhere\"]\n",
                "1: metrics: \"nowhere\" is not HOST:PORT",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text);
            assert!(
                e.starts_with(want),
                "{text:?}: {e:?} does not start with {want:?}"
            );
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }
}
