//! Who may read what the host serves. The collector's ingest token (`[http] token`) sits in
//! public web pages, so it cannot guard the outputs; this module holds what does:
//!
//! - the read token (`[http] read_token`, or `EDDY_HTTP_READ_TOKEN`): when set,
//!   `/v1/stream`, `/v1/ws` and `/v1/outputs` need it, as `Authorization: Bearer <token>`
//!   or as the `eddy_read` cookie that `POST /v1/login` (with the bearer header) sets for the
//!   dashboard page: HttpOnly, SameSite=Strict, for `/v1` only, gone with the browser
//!   session, and never in a URL that a proxy would log;
//! - the WebSocket's `Origin`: a browser's upgrade from a page of another origin than the
//!   host's own or `[http] cors_origins` is refused (WebSockets have no CORS: without this,
//!   any page a user visits could read `ws://127.0.0.1:9464/v1/ws`);
//! - the `Host` header, against DNS rebinding: bound to loopback (or with `[http]
//!   allowed_hosts` set), a request naming another host is refused.

use crate::config::HttpConfig;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;

/// The environment variable that sets the read token (over `[http] read_token`).
pub const READ_TOKEN_ENV: &str = "EDDY_HTTP_READ_TOKEN";
/// The cookie `POST /v1/login` sets.
const COOKIE: &str = "eddy_read";

/// What the guards compare requests with.
#[derive(Debug, Clone, Default)]
pub struct Access {
    read_token: Option<String>,
    /// Origins (besides the host's own) whose pages may open the WebSocket; `*`: any.
    origins: Vec<String>,
    /// Host names a request may name; empty: any.
    hosts: Vec<String>,
}

/// Why a request was turned away.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    #[error(
        "the live stream needs the read token ([http] read_token): `Authorization: Bearer <token>`, or sign in on the dashboard page"
    )]
    NoReadToken,
    #[error(
        "a WebSocket from a page of `{0}` is refused: only the host's own pages and [http] cors_origins may open it"
    )]
    Origin(String),
    #[error(
        "this host does not answer for `{0}`: add the name to [http] allowed_hosts if it is yours"
    )]
    Host(String),
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let status = match self {
            Denied::NoReadToken => StatusCode::UNAUTHORIZED,
            Denied::Origin(_) | Denied::Host(_) => StatusCode::FORBIDDEN,
        };
        let mut r = (status, self.to_string() + "\n").into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl Access {
    /// What `config` allows, for a server bound to `bound`; `EDDY_HTTP_READ_TOKEN`
    /// overrides `[http] read_token`.
    pub fn new(config: &HttpConfig, bound: SocketAddr) -> anyhow::Result<Access> {
        let from_env = std::env::var(READ_TOKEN_ENV).ok().filter(|t| !t.is_empty());
        if let Some(t) = &from_env
            && !crate::config::valid_token(t)
        {
            anyhow::bail!(
                "{READ_TOKEN_ENV} must be 1 to 4096 printable ASCII characters without spaces (unset it for no read token)"
            );
        }
        let mut hosts = config.allowed_hosts.clone();
        if bound.ip().is_loopback() {
            hosts.extend(["localhost", "127.0.0.1", "[::1]"].map(String::from));
            hosts.push(bound.ip().to_string());
        }
        Ok(Access {
            read_token: from_env.or_else(|| config.read_token.clone()),
            origins: config.cors_origins.clone(),
            hosts: if config.allowed_hosts.is_empty() && !bound.ip().is_loopback() {
                Vec::new()
            } else {
                hosts
            },
        })
    }

    /// Whether the outputs are readable by anyone who reaches the port.
    pub fn outputs_open(&self) -> bool {
        self.read_token.is_none()
    }

    /// Whether a request may read the outputs.
    pub fn check_read(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let Some(token) = &self.read_token else {
            return Ok(());
        };
        let bearer = bearer(headers);
        let cookie = cookie(headers, COOKIE);
        if bearer.is_some_and(|b| same(b.as_bytes(), token.as_bytes()))
            || cookie.is_some_and(|c| same(&c, token.as_bytes()))
        {
            Ok(())
        } else {
            Err(Denied::NoReadToken)
        }
    }

    /// Whether a WebSocket upgrade's `Origin` (if a browser sent one) may open it.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return Ok(()); // not a browser: the read token is what guards it
        };
        let own = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|host| {
                origin.split_once("://").is_some_and(|(scheme, rest)| {
                    matches!(scheme, "http" | "https") && rest == host
                })
            });
        if own || self.origins.iter().any(|o| o == "*" || o == origin) {
            Ok(())
        } else {
            Err(Denied::Origin(origin.chars().take(200).collect()))
        }
    }

    /// Whether the request's `Host` names this host (see the module's doc).
    fn check_host(&self, headers: &HeaderMap) -> Result<(), Denied> {
        if self.hosts.is_empty() {
            return Ok(());
        }
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // The name without its port (`[::1]:9464`, `localhost:9464`, `shop.example`).
        let name = match host.rfind(':') {
            Some(i) if !host[i..].contains(']') => &host[..i],
            _ => host,
        };
        if self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            Ok(())
        } else {
            Err(Denied::Host(host.chars().take(200).collect()))
        }
    }

    /// The `Set-Cookie` that lets a browser session read the outputs.
    fn session_cookie(&self) -> Option<HeaderValue> {
        let token = self.read_token.as_ref()?;
        let value =
            percent_encoding::utf8_percent_encode(token, percent_encoding::NON_ALPHANUMERIC);
        HeaderValue::from_str(&format!(
            "{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/v1"
        ))
        .ok()
    }
}

/// `POST /v1/login` with `Authorization: Bearer <read token>`: 204 and the session cookie;
/// 401 with a wrong token; 404 when no read token is set (nothing to sign in to).
pub fn login(access: &Access, headers: &HeaderMap) -> Response {
    if access.outputs_open() {
        return (
            StatusCode::NOT_FOUND,
            "no [http] read_token is set: the outputs are open, there is nothing to sign in to\n",
        )
            .into_response();
    }
    if bearer(headers).is_none() {
        return Denied::NoReadToken.into_response();
    }
    if let Err(denied) = access.check_read(headers) {
        return denied.into_response();
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Some(cookie) = access.session_cookie() {
        r.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    r
}

/// Middleware: refuses a request whose `Host` is not this host's (see [`Access`]).
pub async fn host_check(
    State(access): State<Arc<Access>>,
    request: Request,
    next: Next,
) -> Response {
    match access.check_host(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(denied) => denied.into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, value) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| value.trim())
}

/// The value of cookie `name`, percent-decoded.
fn cookie(headers: &HeaderMap, name: &str) -> Option<Vec<u8>> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| percent_encoding::percent_decode_str(v).collect())
        })
}

/// Compares in time that depends on the lengths only, not on where the bytes differ.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn access(read_token: Option<&str>, bound: &str, allowed: &[&str]) -> Access {
        let config = HttpConfig {
            read_token: read_token.map(String::from),
            allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
            cors_origins: vec!["https://shop.example".into()],
            ..HttpConfig::default()
        };
        Access::new(&config, bound.parse().unwrap()).unwrap()
    }

    #[test]
    fn the_read_token_comes_as_a_bearer_header_or_the_session_cookie() {
        let a = access(Some("r/e+a=d"), "127.0.0.1:9464", &[]);
        assert_eq!(a.check_read(&headers(&[])), Err(Denied::NoReadToken));
        assert!(
            a.check_read(&headers(&[("authorization", "Bearer r/e+a=d")]))
                .is_ok()
        );
        assert!(
            a.check_read(&headers(&[("authorization", "Bearer ingest")]))
                .is_err()
        );
        let cookie = a.session_cookie().unwrap();
        let cookie = cookie.to_str().unwrap();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let value = cookie.split(';').next().unwrap();
        assert!(
            a.check_read(&headers(&[("cookie", &format!("x=1; {value}"))]))
                .is_ok()
        );
        assert!(
            a.check_read(&headers(&[("cookie", "eddy_read=nope")]))
                .is_err()
        );
        assert!(
            access(None, "127.0.0.1:9464", &[])
                .check_read(&headers(&[]))
                .is_ok()
        );
    }

    #[test]
    fn a_websocket_from_another_sites_page_is_refused() {
        let a = access(None, "127.0.0.1:9464", &[]);
        let from = |origin: &str| {
            a.check_origin(&headers(&[("host", "127.0.0.1:9464"), ("origin", origin)]))
        };
        assert!(from("http://127.0.0.1:9464").is_ok());
        assert!(from("https://shop.example").is_ok());
        assert!(from("http://evil.example").is_err());
        assert!(from("http://127.0.0.1:9465").is_err());
        assert!(
            a.check_origin(&headers(&[("host", "x")])).is_ok(),
            "no Origin: not a browser"
        );
    }

    #[test]
    fn bound_to_loopback_only_its_own_names_are_answered() {
        let a = access(None, "127.0.0.1:9464", &["eddy.internal"]);
        let host = |h: &str| a.check_host(&headers(&[("host", h)]));
        for ok in [
            "localhost:9464",
            "127.0.0.1:9464",
            "[::1]:9464",
            "LOCALHOST",
            "eddy.internal:80",
        ] {
            assert!(host(ok).is_ok(), "{ok}");
        }
        for refused in ["evil.example:9464", "127.0.0.1.evil.example", ""] {
            assert!(host(refused).is_err(), "{refused}");
        }
        // Bound to every interface without allowed_hosts: any name.
        assert!(
            access(None, "0.0.0.0:9464", &[])
                .check_host(&headers(&[("host", "x")]))
                .is_ok()
        );
        let named = access(None, "0.0.0.0:9464", &["eddy.example"]);
        assert!(named.check_host(&headers(&[("host", "x")])).is_err());
    }
}
