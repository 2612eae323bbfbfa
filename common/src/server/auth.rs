//! Bearer-token authentication of the gRPC port: one tower layer in front of
//! every service ([`AuthLayer`], installed by [`super::serve`]).
//!
//! A request carries `authorization: Bearer <token>` in its metadata (the
//! scheme is case-insensitive). Which token it needs depends on its service:
//!
//! | service | token |
//! |---|---|
//! | `grpc.health.v1.Health`, server reflection (v1, v1alpha) | none |
//! | `tern.replication.v1.Replication` (Sync, DbSync) | `auth.replication_token` |
//! | everything else (`tern.kv.v1.Kv`, `tern.admin.v1.Admin`, unknown paths) | `auth.token` |
//!
//! A token that is not configured leaves its services open (with a warning
//! at start when the port is not on a loopback address). The two tokens are
//! separate: the client token does not open Replication, nor the reverse.
//! A missing or wrong token is answered UNAUTHENTICATED, with a message
//! naming the token expected (never a value), counted in
//! `Info.counters.auth_failures` and logged at most once a second.
//! Tokens are compared through their SHA-256 digests in constant time, so
//! neither their bytes nor their length leak through timing; they never
//! appear in logs or in `Debug` output.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::body::Body;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::server::TcpConnectInfo;

use super::connections::RateLimited;
use crate::config::{AuthConfig, Secret};

/// Services open without a token.
pub const OPEN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];
/// The service that needs the replication token.
pub const REPLICATION_SERVICE: &str = "tern.replication.v1.Replication";

/// Which token a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Open,
    Client,
    Replication,
}

/// The token the request to `path` (`/package.Service/Method`) needs.
pub fn need(path: &str) -> Need {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map_or("", |(s, _)| s);
    if OPEN_SERVICES.contains(&service) {
        Need::Open
    } else if service == REPLICATION_SERVICE {
        Need::Replication
    } else {
        Need::Client
    }
}

type TokenDigest = [u8; 32];

fn digest(token: &[u8]) -> TokenDigest {
    Sha256::digest(token).into()
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Wrong,
}

/// The bearer token of an `authorization` value, `None` when it is not
/// `Bearer <token>`.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..])
}

/// Checks the `authorization` header against `expected`.
fn check(headers: &http::HeaderMap, expected: &TokenDigest) -> Result<(), Refusal> {
    let Some(token) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
    else {
        return Err(Refusal::Missing);
    };
    if bool::from(digest(token).ct_eq(expected)) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
}

fn refusal_message(need: Need, refusal: Refusal) -> &'static str {
    match (need, refusal) {
        (Need::Replication, Refusal::Missing) => {
            "tern.replication.v1.Replication needs `authorization: Bearer <token>` with the \
             master's auth.replication_token (a slave sends its slave.master_token)"
        }
        (Need::Replication, Refusal::Wrong) => {
            "the bearer token is not the master's auth.replication_token, which \
             tern.replication.v1.Replication needs (a slave sends its slave.master_token)"
        }
        (_, Refusal::Missing) => {
            "this service needs `authorization: Bearer <token>` with the node's auth.token"
        }
        (_, Refusal::Wrong) => {
            "the bearer token is not the node's auth.token, which this service needs"
        }
    }
}

struct Inner {
    client: Option<TokenDigest>,
    replication: Option<TokenDigest>,
    failures: AtomicU64,
    log: Mutex<RateLimited>,
}

/// The tokens a server requires and its count of refused requests.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("client_token", &self.inner.client.is_some())
            .field("replication_token", &self.inner.replication.is_some())
            .field("failures", &self.failures())
            .finish()
    }
}

impl Auth {
    fn new(client: Option<&Secret>, replication: Option<&Secret>) -> Auth {
        Auth {
            inner: Arc::new(Inner {
                client: client.map(|t| digest(t.expose().as_bytes())),
                replication: replication.map(|t| digest(t.expose().as_bytes())),
                failures: AtomicU64::new(0),
                log: Mutex::new(RateLimited::new()),
            }),
        }
    }

    /// No token required anywhere.
    pub fn open() -> Auth {
        Auth::new(None, None)
    }

    /// The tokens of `[auth]` (token files already read by `Config::load`).
    pub fn from_config(c: &AuthConfig) -> Auth {
        Auth::new(c.token.as_ref(), c.replication_token.as_ref())
    }

    /// Requests refused so far (`Info.counters.auth_failures`).
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Logs what is open and warns when that is reachable from other hosts,
    /// or when tokens would cross the network in clear text (`tls` off).
    pub fn log_at_start(&self, listen: SocketAddr, tls: bool) {
        let i = &self.inner;
        let mut open = Vec::new();
        if i.client.is_none() {
            open.push("auth.token (Kv, Admin)");
        }
        // Masters, and slaves for their own slaves (cascading), serve Replication.
        if i.replication.is_none() {
            open.push("auth.replication_token (Replication: Sync, DbSync)");
        }
        let any_token = i.client.is_some() || i.replication.is_some();
        if any_token && !tls && !listen.ip().is_loopback() {
            tracing::warn!(
                %listen,
                "bearer tokens without TLS: they cross the network in clear text; \
                 set server.tls_cert and server.tls_key"
            );
        }
        if open.is_empty() {
            tracing::info!(%listen, "bearer tokens required (auth.token, auth.replication_token)");
        } else if listen.ip().is_loopback() {
            tracing::info!(%listen, unset = ?open, "no bearer token required for these services (loopback only)");
        } else {
            tracing::warn!(
                %listen,
                unset = ?open,
                "no bearer token configured: anyone who can reach this address can use these \
                 services; set auth.token / auth.replication_token (or their _file forms)"
            );
        }
    }

    /// Whether clients must present `auth.token` (the RESP front asks for
    /// `AUTH` first).
    pub fn client_token_required(&self) -> bool {
        self.inner.client.is_some()
    }

    /// Checks a client token sent some other way than a bearer header (the
    /// RESP front's `AUTH`), in constant time; a wrong one is counted in
    /// `auth_failures`. `true` when no token is required.
    pub fn check_client_token(&self, token: &[u8]) -> bool {
        let Some(expected) = &self.inner.client else {
            return true;
        };
        let ok = bool::from(digest(token).ct_eq(expected));
        if !ok {
            self.count_failure();
        }
        ok
    }

    /// Counts a refused authentication (`auth_failures`).
    pub fn count_failure(&self) {
        self.inner.failures.fetch_add(1, Ordering::Relaxed);
    }

    fn expected(&self, need: Need) -> Option<&TokenDigest> {
        match need {
            Need::Open => None,
            Need::Client => self.inner.client.as_ref(),
            Need::Replication => self.inner.replication.as_ref(),
        }
    }

    /// `Ok` when the request may go on, else the UNAUTHENTICATED status.
    fn authorize(&self, req: &http::Request<Body>) -> Result<(), tonic::Status> {
        let need = need(req.uri().path());
        let Some(expected) = self.expected(need) else {
            return Ok(());
        };
        let Err(refusal) = check(req.headers(), expected) else {
            return Ok(());
        };
        let failures = self.inner.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let log = self.inner.log.lock().map(|mut l| l.check());
        if let Ok(Some(held_back)) = log {
            let remote = req
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(|c| c.remote_addr);
            tracing::warn!(
                path = req.uri().path(),
                ?remote,
                reason = ?refusal,
                failures,
                held_back,
                "refused a request without the right bearer token"
            );
        }
        Err(tonic::Status::unauthenticated(refusal_message(
            need, refusal,
        )))
    }
}

/// The layer [`super::serve`] puts in front of every service.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    pub auth: Auth,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = RequireToken<S>;

    fn layer(&self, inner: S) -> RequireToken<S> {
        RequireToken {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RequireToken<S> {
    inner: S,
    auth: Auth,
}

use super::BoxFuture;

impl<S> tower::Service<http::Request<Body>> for RequireToken<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    /// Always ready: a refused request must not take a slot of the limits
    /// behind this layer, so the inner service is readied in `call`.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if let Err(status) = self.auth.authorize(&req) {
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(tower::ServiceExt::oneshot(inner, req))
    }
}

/// `Bearer <token>` as a metadata value.
pub fn bearer_value(token: &Secret) -> AsciiMetadataValue {
    // A Secret holds visible ASCII only (checked when it was made).
    AsciiMetadataValue::try_from(format!("Bearer {}", token.expose()))
        .expect("a Secret is visible ASCII")
}

/// Adds `authorization: Bearer <token>` to `md` when `token` is set.
pub fn insert_bearer(md: &mut MetadataMap, token: Option<&Secret>) {
    if let Some(t) = token {
        md.insert("authorization", bearer_value(t));
    }
}

/// A client interceptor adding `authorization: Bearer <token>` to every
/// request (none when built without a token).
#[derive(Clone, Debug, Default)]
pub struct BearerInterceptor(Option<AsciiMetadataValue>);

impl BearerInterceptor {
    pub fn new(token: Option<&Secret>) -> BearerInterceptor {
        BearerInterceptor(token.map(bearer_value))
    }
}

impl tonic::service::Interceptor for BearerInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_string()).unwrap()
    }

    fn request(path: &str, authorization: Option<&str>) -> http::Request<Body> {
        let mut b = http::Request::builder().uri(path);
        if let Some(a) = authorization {
            b = b.header("authorization", a);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn services_need_their_token() {
        assert_eq!(need("/tern.kv.v1.Kv/Put"), Need::Client);
        assert_eq!(need("/tern.kv.v1.Kv/Pipeline"), Need::Client);
        assert_eq!(need("/tern.admin.v1.Admin/Info"), Need::Client);
        assert_eq!(
            need("/tern.replication.v1.Replication/Sync"),
            Need::Replication
        );
        assert_eq!(
            need("/tern.replication.v1.Replication/DbSync"),
            Need::Replication
        );
        assert_eq!(need("/grpc.health.v1.Health/Check"), Need::Open);
        assert_eq!(
            need("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Need::Open
        );
        assert_eq!(
            need("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Need::Open
        );
        // Unknown or malformed paths need the client token.
        assert_eq!(need("/tern.kv.v2.Kv/Put"), Need::Client);
        assert_eq!(need("/grpc.health.v1.Health"), Need::Client);
        assert_eq!(need(""), Need::Client);
        assert_eq!(need("/"), Need::Client);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_strict() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"abc"), None);
    }

    #[test]
    fn tokens_are_checked_per_service_and_failures_counted() {
        let auth = Auth::new(Some(&secret("client-1")), Some(&secret("repl-2")));
        let ok = |p: &str, a: Option<&str>| auth.authorize(&request(p, a)).is_ok();
        assert!(ok("/tern.kv.v1.Kv/Get", Some("Bearer client-1")));
        assert!(ok(
            "/tern.replication.v1.Replication/Sync",
            Some("Bearer repl-2")
        ));
        assert!(ok("/grpc.health.v1.Health/Check", None));
        assert_eq!(auth.failures(), 0);
        let code = |p: &str, a: Option<&str>| auth.authorize(&request(p, a)).unwrap_err();
        let s = code("/tern.kv.v1.Kv/Get", None);
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().contains("auth.token"), "{}", s.message());
        // Swapped tokens open nothing.
        let s = code("/tern.kv.v1.Kv/Get", Some("Bearer repl-2"));
        assert!(
            s.message().contains("not the node's auth.token"),
            "{}",
            s.message()
        );
        let s = code(
            "/tern.replication.v1.Replication/DbSync",
            Some("Bearer client-1"),
        );
        assert!(
            s.message().contains("auth.replication_token"),
            "{}",
            s.message()
        );
        assert!(!s.message().contains("client-1") && !s.message().contains("repl-2"));
        code("/tern.admin.v1.Admin/Info", Some("Bearer client-1x"));
        code("/tern.admin.v1.Admin/Info", Some("Bearer client-"));
        code("/tern.admin.v1.Admin/Info", Some("client-1"));
        assert_eq!(auth.failures(), 6);
    }

    #[test]
    fn no_token_configured_is_open() {
        let auth = Auth::open();
        assert!(auth.authorize(&request("/tern.kv.v1.Kv/Put", None)).is_ok());
        assert!(
            auth.authorize(&request(
                "/tern.replication.v1.Replication/Sync",
                Some("Bearer x")
            ))
            .is_ok()
        );
        assert_eq!(auth.failures(), 0);
        // Only one of the two set: the other stays open.
        let auth = Auth::new(None, Some(&secret("r")));
        assert!(auth.authorize(&request("/tern.kv.v1.Kv/Put", None)).is_ok());
        assert!(
            auth.authorize(&request("/tern.replication.v1.Replication/Sync", None))
                .is_err()
        );
    }

    #[test]
    fn debug_output_hides_tokens() {
        let auth = Auth::new(Some(&secret("s3cret-value")), None);
        assert!(!format!("{auth:?}").contains("s3cret"));
        assert!(!format!("{:?}", secret("s3cret-value")).contains("s3cret"));
        let mut md = MetadataMap::new();
        insert_bearer(&mut md, Some(&secret("t0k")));
        assert_eq!(md.get("authorization").unwrap(), "Bearer t0k");
    }
}
