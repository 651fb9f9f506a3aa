//! The command line, declared with clap's derive: every command, its options
//! and their help. Nothing here runs anything; `cli::run` dispatches.
//!
//! `serve`'s options are one struct, [`ServeOptions`], that is also the
//! config file's schema (`serve --config FILE`): serde reads the same fields
//! under the long flags' names, so a key and its flag can never drift apart.

use crate::cli::size::{Size, SizeOrPercent};
use blobmgr::metrics::http::MetricsAddr;
use clap::{Args, Parser, Subcommand};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Default socket path of every command.
pub const DEFAULT_SOCK: &str = ".blobmgr/blobmgr.sock";
/// Default work dir (the cache) of `serve` and `cache ls`.
pub const DEFAULT_WORKDIR: &str = ".blobmgr/work";
/// Default backend directory of `serve`, created when defaulted.
pub const DEFAULT_BACKEND: &str = "blobs";
/// Environment variable read when `--sock` is not given.
pub const SOCK_ENV: &str = "BLOBMGR_SOCK";

const AFTER_HELP: &str = "\
Defaults are relative to the current directory: socket .blobmgr/blobmgr.sock
(or $BLOBMGR_SOCK), work dir .blobmgr/work, backend directory ./blobs.
Sizes take K, M, G, T suffixes, powers of 1024 (512M, 10G, 1Ti).
Logging: RUST_LOG=info|debug|... (to stderr).";

/// blobmgr: the per-host blob cache of lazily pulled container images.
#[derive(Parser, Debug)]
#[command(
    name = "blobmgr",
    version = crate::cli::VERSION,
    propagate_version = true,
    args_override_self = true,
    subcommand_required = true,
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// One value per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground
    ///
    /// Serves the blobs of --backend to the clients of --sock, caching them
    /// in --workdir. SIGTERM or SIGINT stops it cleanly (exit status 0,
    /// socket file removed). Settings may come from a TOML file (--config);
    /// flags given on the command line override it. Under systemd it serves
    /// the socket passed to it (LISTEN_FDS, left in place at exit) and
    /// notifies readiness (NOTIFY_SOCKET). One daemon per work dir.
    Serve(ServeOptions),
    /// Check that the daemon answers (one Noop round trip)
    Ping(SockArg),
    /// Write a blob's bytes (or a range of them) to standard output
    Cat(CatArgs),
    /// Warm the cache with whole blobs
    ///
    /// GetBlob, then FetchRange over each whole blob, --parallel blobs at a
    /// time. On a terminal each blob gets a progress bar on stderr;
    /// otherwise each finished blob prints `ID SIZE bytes in SECS s` on
    /// stdout. The exit status is 0 only if every blob was fetched.
    Fetch(FetchArgs),
    /// Summarise a running daemon from its metrics
    ///
    /// Pid, uptime, version, connections, cache size and limit, hit ratio,
    /// fills in flight and backend errors, from `GET /metrics` on the Unix
    /// socket <sock>.metrics that every daemon serves, or on --metrics.
    Status(StatusArgs),
    /// Inspect the cache directory without a daemon
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Hand a running daemon over to the binary now installed at its path
    ///
    /// Zero-downtime upgrade: sends SIGUSR2 to the daemon behind --sock (found
    /// with SO_PEERCRED; a process that is not a blobmgr daemon is refused,
    /// not signalled), which starts the binary installed at the path it was
    /// started from with the same arguments, hands it the listening socket and
    /// the work dir lock, answers what it has read and exits. Waits until the
    /// new daemon answers; if the new binary fails, the old one keeps serving
    /// and this exits non-zero.
    Upgrade(SockArg),
    /// Serve the blobs as a read-only FUSE file system
    ///
    /// Every blob id is a read-only file of the blob's size under
    /// MOUNTPOINT: `MOUNTPOINT/ID` for a plain id, and for a reference
    /// `MOUNTPOINT/HOST[:PORT]/REPO/.../NAME@sha256:HEX` (directories are
    /// virtual and list empty). A read fetches only the granules it touches;
    /// the page cache keeps them. A file-system image stored as a blob
    /// (EROFS, squashfs) can then be mounted lazily from its file. Runs in
    /// the foreground as a client of the daemon at --sock; SIGTERM or SIGINT
    /// unmounts and exits 0. A dead mount left at MOUNTPOINT by a crash is
    /// replaced. See docs/MOUNT.md.
    Mount(MountArgs),
    /// Print a shell completion script to standard output
    ///
    /// e.g. `blobmgr completions bash > /etc/bash_completion.d/blobmgr`.
    Completions(CompletionsArgs),
}

/// `--sock`, for commands that talk to a daemon.
#[derive(Args, Debug)]
pub struct SockArg {
    /// The daemon's socket
    #[arg(long, value_name = "PATH", env = SOCK_ENV, default_value = DEFAULT_SOCK)]
    pub sock: PathBuf,
}

#[derive(Args, Debug)]
pub struct CatArgs {
    #[command(flatten)]
    pub sock: SockArg,
    /// The blob's id
    #[arg(value_name = "BLOB_ID")]
    pub id: String,
    /// First byte to write
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "0",
        allow_negative_numbers = true
    )]
    pub offset: Size,
    /// Bytes to write (default: to the blob's end)
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    pub length: Option<Size>,
}

#[derive(Args, Debug)]
pub struct FetchArgs {
    #[command(flatten)]
    pub sock: SockArg,
    /// Blobs fetched at the same time
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,
    /// Blob ids (plain ids or OCI references)
    #[arg(value_name = "ID", required = true)]
    pub ids: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The daemon's socket: its metrics are read from PATH.metrics
    /// [env: BLOBMGR_SOCK] [default: .blobmgr/blobmgr.sock]
    // Not clap's `env`: clap would count the variable as a given --sock and
    // refuse it beside --metrics.
    #[arg(long, value_name = "PATH")]
    pub sock: Option<PathBuf>,
    /// Read the metrics from this endpoint instead: HOST:PORT or unix:PATH
    #[arg(long, value_name = "ADDR", conflicts_with = "sock")]
    pub metrics: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// List the cached blobs of a work dir (read-only, safe beside a daemon)
    ///
    /// One row per blob: id, size, bytes cached, whether the complete blob
    /// was verified, and last use (the data file's modification time: when
    /// bytes were last written to it). A damaged map is reported on its row.
    Ls(CacheLsArgs),
}

#[derive(Args, Debug)]
pub struct CacheLsArgs {
    /// The daemon's work dir
    #[arg(long, value_name = "DIR", default_value = DEFAULT_WORKDIR)]
    pub workdir: PathBuf,
    /// Print a JSON array instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub sock: SockArg,
    /// Let users other than the mounting one use the mount (FUSE allow_other)
    #[arg(long)]
    pub allow_other: bool,
    /// Unit reads are rounded out to; set it to the daemon's --granule
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "1M",
        allow_negative_numbers = true
    )]
    pub granule: Size,
    /// Pass opens of complete blobs through to the cache file (FUSE passthrough);
    /// an EROFS image can then only be mounted from its file through a loop device
    #[arg(long)]
    pub passthrough: bool,
    /// Threads serving file system requests
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// Seconds a call to the daemon may take (a read waiting longer fails with EIO)
    #[arg(long, value_name = "SECS", default_value = "30")]
    pub timeout: Seconds,
    /// Where to mount the file system (an existing directory)
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write completions for
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

// Every option of `serve`, from the command line or the config file. (A
// plain comment: clap would take a doc comment as the command's help.)
//
// It has more than a dozen fields because it is the flat list of the
// daemon's flags (and of the config file's keys, which are the same):
// grouping them would only split that list in two places. Every field is
// optional so that "not given" can be told apart from "given as the
// default", which the file/flag merge and the backend-dir default need.
#[derive(Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeOptions {
    /// Read settings from this TOML file (keys named like these flags)
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Socket path [default: .blobmgr/blobmgr.sock]
    #[arg(long, value_name = "PATH", env = SOCK_ENV)]
    pub sock: Option<PathBuf>,
    /// Cache directory [default: .blobmgr/work]
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// A directory of blobs, or http(s)://HOST[:PORT]/REPOSITORY [default: blobs, created]
    #[arg(long, value_name = "DIR|URL")]
    pub backend: Option<String>,
    /// Worker threads for backend reads and cache writes [default: 4]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Connections beyond it are accepted and closed at once [default: 16384]
    #[arg(long, value_name = "N")]
    pub max_conns: Option<usize>,
    /// Readiness granule, a power of two of at least 4K [default: 1M]
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    pub granule: Option<Size>,
    /// Largest readahead window for a sequential reader; 0 turns readahead off [default: 256M]
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    pub readahead: Option<Size>,
    /// Most bytes of blob data to keep; least recently used blobs are evicted [default: no limit]
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    pub cache_size: Option<Size>,
    /// Free space to keep on the work dir's file system, SIZE or PERCENT of it; blobs are evicted to keep it [default: 10%]
    #[arg(long, value_name = "SIZE|PERCENT", allow_negative_numbers = true)]
    pub min_free: Option<SizeOrPercent>,
    /// Socket file mode, in octal, whatever the umask [default: 0600]
    #[arg(long, value_name = "OCTAL")]
    pub sock_mode: Option<OctalMode>,
    /// Group (name or gid) of the socket file
    #[arg(long, value_name = "GROUP")]
    pub sock_group: Option<Group>,
    /// Peer uid allowed to connect besides our own and root's (repeatable)
    #[arg(long, value_name = "UID")]
    #[serde(default)]
    pub allow_uid: Vec<u32>,
    /// Seconds a backend call may take before its requests fail [default: 60]
    #[arg(long, value_name = "SECS")]
    pub backend_timeout: Option<Seconds>,
    /// Registry retries on connection errors, 429 and 5xx [default: 3]
    #[arg(long, value_name = "N")]
    pub backend_retries: Option<u32>,
    /// Registry user name for basic auth
    #[arg(long, value_name = "NAME")]
    pub registry_user: Option<String>,
    /// File holding the registry password (else $BLOBMGR_REGISTRY_PASSWORD)
    #[arg(long, value_name = "PATH")]
    pub registry_password_file: Option<PathBuf>,
    /// Also serve GET /metrics on HOST:PORT or unix:PATH (repeatable); <sock>.metrics always is
    #[arg(long, value_name = "ADDR")]
    #[serde(default)]
    pub metrics: Vec<MetricsEndpoint>,
    /// Registry hosts in containerd's certs.d layout (DIR/HOST[:PORT]/hosts.toml): mirrors for references
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
    /// Docker config.json with registry credentials [default: $DOCKER_CONFIG/config.json, ~/.docker/config.json]
    #[arg(long, value_name = "PATH")]
    pub docker_config: Option<PathBuf>,
    /// Registry hosts references may name (repeatable; `*` matches one label: *.example.com, 127.0.0.1:5000) [default: any]
    #[arg(long, value_name = "PATTERN")]
    #[serde(default)]
    pub allow_registry: Vec<String>,
}

impl ServeOptions {
    /// These options over `file`'s: a field given here wins; a repeatable
    /// option given here replaces the file's list rather than adding to it.
    pub fn over(self, file: ServeOptions) -> ServeOptions {
        ServeOptions {
            config: self.config,
            sock: self.sock.or(file.sock),
            workdir: self.workdir.or(file.workdir),
            backend: self.backend.or(file.backend),
            workers: self.workers.or(file.workers),
            max_conns: self.max_conns.or(file.max_conns),
            granule: self.granule.or(file.granule),
            readahead: self.readahead.or(file.readahead),
            cache_size: self.cache_size.or(file.cache_size),
            min_free: self.min_free.or(file.min_free),
            sock_mode: self.sock_mode.or(file.sock_mode),
            sock_group: self.sock_group.or(file.sock_group),
            allow_uid: if self.allow_uid.is_empty() {
                file.allow_uid
            } else {
                self.allow_uid
            },
            backend_timeout: self.backend_timeout.or(file.backend_timeout),
            backend_retries: self.backend_retries.or(file.backend_retries),
            registry_user: self.registry_user.or(file.registry_user),
            registry_password_file: self.registry_password_file.or(file.registry_password_file),
            metrics: if self.metrics.is_empty() {
                file.metrics
            } else {
                self.metrics
            },
            hosts_dir: self.hosts_dir.or(file.hosts_dir),
            docker_config: self.docker_config.or(file.docker_config),
            allow_registry: if self.allow_registry.is_empty() {
                file.allow_registry
            } else {
                self.allow_registry
            },
        }
    }
}

/// A file mode in octal, at most 0777 (`0660`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OctalMode(pub u32);

impl FromStr for OctalMode {
    type Err = String;
    fn from_str(s: &str) -> Result<OctalMode, String> {
        u32::from_str_radix(s, 8)
            .ok()
            .filter(|m| *m <= 0o777 && !s.starts_with('+'))
            .map(OctalMode)
            .ok_or_else(|| format!("{s:?} is not an octal mode such as 0660"))
    }
}

/// A metrics endpoint, `HOST:PORT` or `unix:PATH` (the library's syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsEndpoint(pub MetricsAddr);

impl FromStr for MetricsEndpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<MetricsEndpoint, String> {
        s.parse().map(MetricsEndpoint)
    }
}

/// A group name or gid, resolved when the daemon starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group(pub String);

impl FromStr for Group {
    type Err = String;
    fn from_str(s: &str) -> Result<Group, String> {
        if s.is_empty() {
            return Err("a group name or gid cannot be empty".into());
        }
        Ok(Group(s.to_string()))
    }
}

/// A positive number of seconds, fractions allowed (`0.5`, `60`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seconds(pub f64);

impl FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Seconds, String> {
        Seconds::new(
            s.parse()
                .map_err(|_| format!("{s:?} is not a number of seconds"))?,
        )
    }
}

impl Seconds {
    fn new(v: f64) -> Result<Seconds, String> {
        if v > 0.0 && v < 1e9 {
            Ok(Seconds(v))
        } else {
            Err(format!("{v} is not a positive number of seconds"))
        }
    }
}

/// Deserialises the config file's value of an option from a string, with
/// the option's `FromStr` (a mode must be a string: `0660` as a TOML
/// integer would be read as decimal), or from a number where `NUMBER` says
/// how.
struct ParseVisitor<T>(&'static str, std::marker::PhantomData<T>);

impl<T: FromStr<Err = String>> Visitor<'_> for ParseVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for OctalMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OctalMode, D::Error> {
        d.deserialize_str(ParseVisitor(
            "an octal mode as a string, e.g. \"0660\"",
            Default::default(),
        ))
    }
}

impl<'de> Deserialize<'de> for MetricsEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MetricsEndpoint, D::Error> {
        d.deserialize_str(ParseVisitor(
            "an address as a string: \"HOST:PORT\" or \"unix:PATH\"",
            Default::default(),
        ))
    }
}

impl<'de> Deserialize<'de> for Group {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Group, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum NameOrGid {
            Name(String),
            Gid(u32),
        }
        match NameOrGid::deserialize(d)? {
            NameOrGid::Name(s) => s.parse().map_err(de::Error::custom),
            NameOrGid::Gid(g) => Ok(Group(g.to_string())),
        }
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Seconds, D::Error> {
        Seconds::new(f64::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_override_the_file_and_lists_replace() {
        let cli = ServeOptions {
            sock: Some("flag.sock".into()),
            allow_uid: vec![7],
            ..Default::default()
        };
        let file = ServeOptions {
            sock: Some("file.sock".into()),
            workdir: Some("file-work".into()),
            allow_uid: vec![1000, 1001],
            ..Default::default()
        };
        let m = cli.over(file);
        assert_eq!(m.sock, Some("flag.sock".into()));
        assert_eq!(m.workdir, Some("file-work".into()));
        assert_eq!(m.allow_uid, vec![7]);
    }

    #[test]
    fn modes_and_seconds() {
        assert_eq!("0660".parse(), Ok(OctalMode(0o660)));
        assert_eq!("777".parse(), Ok(OctalMode(0o777)));
        assert!("1000".parse::<OctalMode>().is_err());
        assert!("0x1".parse::<OctalMode>().is_err());
        assert!("+7".parse::<OctalMode>().is_err());
        assert_eq!("0.5".parse(), Ok(Seconds(0.5)));
        for bad in ["0", "-1", "nan", "inf", "1e9", "x"] {
            assert!(bad.parse::<Seconds>().is_err(), "{bad}");
        }
    }
}
