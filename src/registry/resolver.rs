//! Host names to addresses for the registry's agents, on the calling thread.
//!
//! ureq 3's `DefaultResolver` looks a name up in a thread of its own,
//! spawned for every new connection whenever the request has a timeout
//! (ours always do), and gives up waiting when the timeout passes, leaving
//! the thread to finish the lookup. [`BlockingResolver`] calls std's
//! [`ToSocketAddrs`] (`getaddrinfo`) where it is: it runs on a worker
//! thread, which may block, and the request's deadline still bounds the
//! connect and everything after it.

use std::net::ToSocketAddrs;
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// Resolves as ureq's `DefaultResolver` does (the URI's port or its
/// scheme's, the agent's IP family, at most 16 addresses), without a
/// thread.
#[derive(Debug, Default)]
pub(super) struct BlockingResolver;

impl Resolver for BlockingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(ureq::Error::BadUri("no scheme or host".into()));
        };
        let Some(host_port) = DefaultResolver::host_and_port(scheme, authority) else {
            return Err(ureq::Error::BadUri(format!("unknown scheme: {scheme}")));
        };
        let mut found = self.empty();
        let family = config.ip_family();
        for addr in family.keep_wanted(host_port.to_socket_addrs()?) {
            if found.try_push(addr).is_err() {
                break;
            }
        }
        if found.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Duration;
    use ureq::config::IpFamily;
    use ureq::unversioned::transport::time;

    /// A timeout already over: ureq's resolver would stop waiting for its
    /// thread at once.
    fn over() -> NextTimeout {
        NextTimeout {
            after: time::Duration::from(Duration::ZERO),
            ..NextTimeout::default()
        }
    }

    fn resolve(uri: &str, family: IpFamily) -> Result<Vec<SocketAddr>, ureq::Error> {
        let config = Config::builder().ip_family(family).build();
        let found = BlockingResolver.resolve(&uri.parse().unwrap(), &config, over())?;
        Ok(found.iter().copied().collect())
    }

    #[test]
    fn names_resolve_where_they_are_asked_with_the_port_or_the_schemes() {
        let any = IpFamily::Any;
        for (uri, addr) in [
            ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
            ("http://[::1]:8080/", "[::1]:8080"),
            ("https://127.0.0.1/", "127.0.0.1:443"),
            ("http://127.0.0.1/", "127.0.0.1:80"),
        ] {
            let want: SocketAddr = addr.parse().unwrap();
            assert_eq!(resolve(uri, any).unwrap(), vec![want], "{uri}");
        }
        // A name, through getaddrinfo (/etc/hosts), within no time at all.
        let local = resolve("http://localhost:5000/", any).unwrap();
        assert!(!local.is_empty());
        let loopback = |a: &SocketAddr| a.ip().is_loopback() && a.port() == 5000;
        assert!(local.iter().all(loopback), "{local:?}");
        // The agent's IP family is kept.
        assert!(matches!(
            resolve("http://127.0.0.1:5000/", IpFamily::Ipv6Only),
            Err(ureq::Error::HostNotFound)
        ));
        assert!(matches!(
            resolve("ftp://127.0.0.1/", any),
            Err(ureq::Error::BadUri(_))
        ));
    }
}
