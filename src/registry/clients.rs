//! The reference backend's endpoint clients, kept for reuse (their
//! connections, tokens and range knowledge) but not for ever: a client is
//! made again after [`CLIENT_TTL`], so rotated or expiring credentials (a
//! helper's short-lived password) take effect without a restart, and at
//! most [`MAX_CLIENTS`] are kept, so the idle connections and buffers of
//! every repository ever pulled do not pile up.

use super::{Registry, Tls};
use crate::backend::EndpointStats;
use crate::credentials::DEFAULT_CACHE_TTL;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a client is reused: as long as a credential helper's answer is.
pub const CLIENT_TTL: Duration = DEFAULT_CACHE_TTL;

/// Most clients kept at once (one per endpoint and repository); beyond it
/// the least recently used one is dropped.
pub const MAX_CLIENTS: usize = 32;

/// Endpoints whose dropped clients' counters are kept apart.
const MAX_RETIRED: usize = 256;

/// The endpoint label of the counters of every endpoint past [`MAX_RETIRED`].
pub const OTHER_ENDPOINTS: &str = "other";

/// A client's key: (API root, repository, TLS settings).
pub type ClientKey = (String, String, Tls);

struct Kept {
    client: Arc<Registry>,
    /// Made again from here on.
    until: Instant,
    last_used: Instant,
}

/// See the module docs.
#[derive(Default)]
pub struct Clients {
    live: HashMap<ClientKey, Kept>,
    /// The counters of clients no longer kept, by endpoint, so that the
    /// metrics, which are counters, never go back. (A call still running
    /// on a dropped client is not counted.)
    retired: HashMap<String, EndpointStats>,
}

impl Clients {
    /// The kept client for `key`, unless it has expired (then dropped).
    pub fn get(&mut self, key: &ClientKey, now: Instant) -> Option<Arc<Registry>> {
        match self.live.get_mut(key) {
            Some(k) if now < k.until => {
                k.last_used = now;
                Some(k.client.clone())
            }
            Some(_) => {
                self.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `client` for `key` until `now + ttl`, replacing any other,
    /// and drops the least recently used client when over [`MAX_CLIENTS`].
    pub fn insert(&mut self, key: ClientKey, client: Arc<Registry>, ttl: Duration, now: Instant) {
        self.remove(&key);
        while self.live.len() >= MAX_CLIENTS {
            let oldest = self.live.iter().min_by_key(|(_, k)| k.last_used);
            match oldest.map(|(key, _)| key.clone()) {
                Some(key) => self.remove(&key),
                None => break,
            }
        }
        let kept = Kept {
            client,
            until: now + ttl,
            last_used: now,
        };
        self.live.insert(key, kept);
    }

    /// Drops the client for `key`, if any, keeping its counters.
    pub fn remove(&mut self, key: &ClientKey) {
        let Some(k) = self.live.remove(key) else {
            return;
        };
        let mut s = k.client.stats();
        // Clients name the hosts: the counters of dropped clients are kept
        // by endpoint for as many endpoints as a host uses, then together.
        if self.retired.len() >= MAX_RETIRED && !self.retired.contains_key(&s.endpoint) {
            s.endpoint = OTHER_ENDPOINTS.into();
        }
        add(&mut self.retired, s);
    }

    /// Every kept client.
    pub fn live(&self) -> impl Iterator<Item = &Arc<Registry>> {
        self.live.values().map(|k| &k.client)
    }

    /// Calls and bytes by endpoint, of kept and dropped clients, sorted.
    pub fn stats(&self) -> Vec<EndpointStats> {
        let mut by: HashMap<String, EndpointStats> = self.retired.clone();
        for c in self.live() {
            add(&mut by, c.stats());
        }
        let mut all: Vec<EndpointStats> = by.into_values().collect();
        all.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        all
    }

    /// How many clients are kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.live.len()
    }
}

/// Adds `s` into the entry of its endpoint.
fn add(by: &mut HashMap<String, EndpointStats>, s: EndpointStats) {
    let e = by
        .entry(s.endpoint.clone())
        .or_insert_with(|| EndpointStats {
            endpoint: s.endpoint.clone(),
            ..Default::default()
        });
    e.ok += s.ok;
    e.errors += s.errors;
    e.bytes += s.bytes;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryOptions;

    fn client(host: &str, repo: &str, ok: u64) -> (ClientKey, Arc<Registry>) {
        let url = url::Url::parse(&format!("http://{host}/v2")).unwrap();
        let r = Registry::endpoint(url.clone(), repo, &RegistryOptions::default()).unwrap();
        for _ in 0..ok {
            r.counters.record(&Ok::<(), _>(()), 10);
        }
        ((url.to_string(), repo.into(), Tls::default()), Arc::new(r))
    }

    #[test]
    fn clients_expire_are_bounded_and_keep_their_counters() {
        let t0 = Instant::now();
        let mut c = Clients::default();
        let (k, r) = client("a.example", "one", 3);
        c.insert(k.clone(), r, CLIENT_TTL, t0);
        assert!(c.get(&k, t0 + CLIENT_TTL / 2).is_some());
        assert!(c.get(&k, t0 + CLIENT_TTL).is_none(), "expired");
        assert_eq!(c.len(), 0);
        let (k2, r2) = client("a.example", "two", 1);
        c.insert(k2, r2, CLIENT_TTL, t0);
        let s = c.stats();
        assert_eq!(s.len(), 1, "one endpoint: {s:?}");
        assert_eq!(
            (s[0].ok, s[0].bytes),
            (4, 40),
            "the expired client's calls stay"
        );

        // Over the bound, the least recently used goes first.
        let keys: Vec<ClientKey> = (0..=MAX_CLIENTS)
            .map(|i| {
                let (k, r) = client("b.example", &format!("r{i}"), 0);
                c.insert(k.clone(), r, CLIENT_TTL, t0);
                k
            })
            .collect();
        assert_eq!(c.len(), MAX_CLIENTS);
        assert!(
            c.get(&keys[MAX_CLIENTS], t0).is_some(),
            "the newest is kept"
        );
        assert_eq!(c.stats()[0].ok, 4, "a.example's calls survive its eviction");

        // Endpoints past the bound share one entry.
        for i in 0..2 * MAX_RETIRED {
            let (k, r) = client(&format!("h{i}.example"), "x", 1);
            c.insert(k.clone(), r, CLIENT_TTL, t0);
            c.remove(&k);
        }
        let s = c.stats();
        assert!(s.len() <= MAX_RETIRED + 1 + MAX_CLIENTS, "{}", s.len());
        let other = s.iter().find(|e| e.endpoint == OTHER_ENDPOINTS).unwrap();
        let total: u64 = s.iter().map(|e| e.ok).sum();
        assert_eq!(total, 4 + 2 * MAX_RETIRED as u64, "no call lost");
        assert!(other.ok > 0);
    }
}
