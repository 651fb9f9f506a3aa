//! The registry's access log, one Combined Log Format line per request
//! (see `registry.rs` for what the registry writes there and when).

/// One line of the registry's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub method: String,
    /// The request path, without the query.
    pub path: String,
    pub query: String,
    pub status: u16,
    /// Bytes of body written to the client (`-` counts as 0).
    pub bytes: u64,
    pub user_agent: String,
}

impl Access {
    /// Parses a Combined Log Format line:
    /// `HOST IDENT USER [TIME] "METHOD URI PROTO" STATUS BYTES "REFERER" "AGENT"`.
    /// Any other line (the registry's logrus lines start with `time=`) is
    /// `None`.
    pub fn parse(line: &str) -> Option<Access> {
        if line.starts_with("time=") {
            return None;
        }
        let (pre, rest) = line.split_once("] \"")?;
        if !pre.contains(" [") {
            return None;
        }
        let (request, rest) = rest.split_once("\" ")?;
        let mut req = request.split(' ');
        let (method, uri, proto) = (req.next()?, req.next()?, req.next()?);
        if !proto.starts_with("HTTP/") || req.next().is_some() {
            return None;
        }
        let mut fields = rest.splitn(3, ' ');
        let status = fields.next()?.parse().ok()?;
        let bytes = match fields.next()? {
            "-" => 0,
            n => n.parse().ok()?,
        };
        let user_agent = fields
            .next()
            .and_then(|t| t.rsplit_once(" \""))
            .map(|(_, ua)| ua.trim_end_matches('"').to_string())
            .unwrap_or_default();
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        Some(Access {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            status,
            bytes,
            user_agent,
        })
    }

    /// `(repository, hex)` when this is a request for a sha256 blob.
    pub fn blob(&self) -> Option<(&str, &str)> {
        let rest = self.path.strip_prefix("/v2/")?;
        let (repo, hex) = rest.rsplit_once("/blobs/sha256:")?;
        Some((repo, hex))
    }
}
