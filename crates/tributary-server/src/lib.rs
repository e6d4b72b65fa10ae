//! The front door: one HTTP server that hosts every implemented system.
//!
//! What is here: the server's configuration and start-up ([`serve`]), API tokens and scopes
//! ([`auth`]), the WebSocket/SSE connection gateway ([`gateway`]), presence of connected users
//! ([`presence`]), the one mapping from engine errors to HTTP statuses ([`error`]), a JSON extractor
//! that answers bad bodies in our error format ([`json`]), overload protection, Prometheus
//! metrics at `/metrics`, `/healthz`, and the OpenAPI document at `/openapi.json` assembled from
//! the routes the systems contribute ([`SystemApi`]), signed webhook POSTs to users'
//! endpoints ([`webhook`]), the follower of a log shared by several nodes ([`shared_log`]), and
//! many callers' writes made as one ([`rounds`]).
//!
//! What is not here: any system's own logic (that lives in `tributary-systems`, which hands its
//! routes in), and any storage (the engine is passed in by the binary).

pub mod auth;
pub mod dashboard;
pub mod error;
pub mod gateway;
pub mod json;
pub mod webhook;
mod metrics_layer;
pub mod presence;
pub mod rate_limits;
pub mod rounds;
pub mod shared_log;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use auth::{ApiToken, USER_HEADER, named_user};
pub use error::{ApiError, blocking, on_backend, renew_leases, wait_in_place};
pub use gateway::{Gateway, WsConnection};
pub use json::Json;
pub use presence::Presence;
pub use rate_limits::RateLimits;
pub use utoipa;
pub use utoipa_axum;

/// Largest request body, in bytes: a full batch of the largest messages fits.
pub const BODY_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Requests served at once before new ones get 503 with `Retry-After`.
pub const IN_FLIGHT_REQUESTS_MAX_DEFAULT: usize = 4096;
/// How long a SIGTERM waits for in-flight requests before the process exits anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The routes one system contributes, and the prefixes that belong to it (for token scopes).
pub struct SystemApi {
    pub id: &'static str,
    pub prefixes: Vec<&'static str>,
    pub router: OpenApiRouter,
}

#[derive(Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tokens: Vec<ApiToken>,
    pub in_flight_max: usize,
    pub body_bytes_max: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            tokens: Vec::new(),
            in_flight_max: IN_FLIGHT_REQUESTS_MAX_DEFAULT,
            body_bytes_max: BODY_BYTES_MAX,
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tributary", description = "Streaming systems on one engine. Errors are {\"error\":{\"code\",\"message\"}}."),
    paths(healthz),
    components(schemas(error::ErrorBody, error::ErrorDetail))
)]
struct BaseApi;

/// `GET /healthz`: 200 while the server accepts work.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "serving")))]
async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    let message = format!("{} is not allowed on {} (the Allow header lists what is)", request.method(), request.uri().path());
    ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message)
}

#[derive(Clone)]
struct Overload {
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

async fn shed_overload(State(overload): State<Overload>, request: Request, next: Next) -> Response {
    let now = overload.in_flight.fetch_add(1, Ordering::AcqRel);
    let _release = Release(overload.in_flight.clone());
    if now >= overload.max {
        return ApiError::overloaded(format!("the server is at its limit of {} requests in flight (IN_FLIGHT_REQUESTS_MAX)", overload.max), 1).into_response();
    }
    next.run(request).await
}

struct Release(Arc<AtomicUsize>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Build the whole router: the systems' routes, the server's own, and the middleware stack
/// (outermost first: metrics, overload, auth, body limit).
pub fn router(config: &ServerConfig, systems: Vec<SystemApi>, extra: Router) -> Router {
    let mut scopes = auth::Scopes { tokens: config.tokens.clone(), prefixes: Vec::new() };
    let mut api = OpenApiRouter::with_openapi(BaseApi::openapi()).routes(utoipa_axum::routes!(healthz));
    for system in systems {
        scopes.prefixes.extend(system.prefixes.iter().map(|p| (p.to_string(), system.id.to_string())));
        api = api.merge(system.router);
    }
    let (routes, openapi) = api.split_for_parts();
    let openapi = Arc::new(openapi);
    let overload = Overload { in_flight: Arc::new(AtomicUsize::new(0)), max: config.in_flight_max };
    routes
        .route("/openapi.json", get(move || { let openapi = openapi.clone(); async move { axum::Json(openapi.as_ref().clone()) } }))
        .route("/metrics", get(metrics_layer::render))
        .merge(extra)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.body_bytes_max))
        .layer(middleware::from_fn_with_state(Arc::new(scopes), auth::require_token))
        .layer(middleware::from_fn_with_state(overload, shed_overload))
        .layer(middleware::from_fn(metrics_layer::track))
}

/// Serve `app` until `shutdown` resolves, then drain in-flight requests (bounded by
/// [`DRAIN_TIMEOUT`]).
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    metrics_layer::install();
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = drained_tx.send(());
    });
    tokio::select! {
        result = server => result,
        _ = async {
            let _ = drained_rx.await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => {
            tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}; exiting anyway");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT). The handlers are installed when this is called, not
/// when the future is first polled: a signal sent once the caller has gone on (say, after it
/// answered its first request) stops it rather than killing the process. Call it on a runtime.
pub fn termination() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).ok();
        let mut interrupt = signal(SignalKind::interrupt()).ok();
        async fn received(signal: &mut Option<Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        async move {
            tokio::select! {
                _ = received(&mut terminate) => {},
                _ = received(&mut interrupt) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    #[cfg(unix)]
    #[tokio::test]
    async fn a_sigterm_sent_before_the_termination_future_is_first_polled_resolves_it() {
        let stopping = super::termination();
        // SAFETY: raising a signal in this process; the handler installed above takes it.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        tokio::time::timeout(std::time::Duration::from_secs(5), stopping).await.expect("the SIGTERM resolves it");
    }
}
