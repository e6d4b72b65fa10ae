//! The front door over real HTTP: the error format and statuses, limits, overload shedding,
//! tokens and scopes, OpenAPI, metrics and graceful shutdown.

mod common;

use std::time::Duration;

use common::{TestServer, error_of, slow_started};
use tributary_server::auth::check_exposure;
use tributary_server::{ApiToken, Gateway, ServerConfig};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

async fn post_json(server: &TestServer, path: &str, body: &str) -> reqwest::Response {
    client().post(server.url(path)).header("content-type", "application/json").body(body.to_string()).send().await.unwrap()
}

#[tokio::test]
async fn a_good_request_passes_through_json_and_blocking() {
    let server = TestServer::default().await;
    let response = post_json(&server, "/v1/test/echo", r#"{"name":"a","count":2}"#).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"name": "a", "count": 2}));
}

#[tokio::test]
async fn an_unknown_route_is_404_in_the_error_format() {
    let server = TestServer::default().await;
    let (status, code, message) = error_of(client().get(server.url("/v1/nowhere")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    assert!(message.contains("/v1/nowhere"), "{message}");
}

#[tokio::test]
async fn a_wrong_method_is_405_in_the_error_format() {
    let server = TestServer::default().await;
    let (status, code, _) = error_of(client().delete(server.url("/v1/test/echo")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
    let response = client().delete(server.url("/v1/test/echo")).send().await.unwrap();
    assert_eq!(response.headers().get("allow").and_then(|v| v.to_str().ok()), Some("POST"));
}

#[tokio::test]
async fn an_engine_error_maps_to_its_status() {
    let server = TestServer::default().await;
    let (status, code, message) = error_of(client().get(server.url("/v1/test/missing")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    assert!(message.contains("absent"), "{message}");
}

#[tokio::test]
async fn malformed_json_is_400_naming_line_and_column() {
    let server = TestServer::default().await;
    let (status, code, message) = error_of(post_json(&server, "/v1/test/echo", "{\"name\": \"a\",\n \"count\": }").await).await;
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    assert!(message.contains("line 2") && message.contains("column"), "{message}");
}

#[tokio::test]
async fn a_field_of_the_wrong_type_is_400_naming_the_field() {
    let server = TestServer::default().await;
    let (status, code, message) = error_of(post_json(&server, "/v1/test/echo", r#"{"name": 7, "count": 1}"#).await).await;
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    assert!(message.contains("name") && message.contains("invalid type"), "{message}");
    let (status, _, message) = error_of(post_json(&server, "/v1/test/echo", r#"{"name": "a"}"#).await).await;
    assert_eq!(status, 400);
    assert!(message.contains("count"), "{message}");
}

#[tokio::test]
async fn a_body_without_a_json_content_type_is_415() {
    let server = TestServer::default().await;
    let response = client().post(server.url("/v1/test/echo")).body(r#"{"name":"a","count":2}"#).send().await.unwrap();
    let (status, code, message) = error_of(response).await;
    assert_eq!((status, code.as_str()), (415, "unsupported_media_type"));
    assert!(message.contains("application/json"), "{message}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let config = ServerConfig { body_bytes_max: 1024, ..ServerConfig::default() };
    let server = TestServer::start(config, Gateway::default()).await;
    let big = format!(r#"{{"name":"{}","count":1}}"#, "x".repeat(4096));
    let (status, code, _) = error_of(post_json(&server, "/v1/test/echo", &big).await).await;
    assert_eq!((status, code.as_str()), (413, "too_large"));
    let small = format!(r#"{{"name":"{}","count":1}}"#, "x".repeat(512));
    assert_eq!(post_json(&server, "/v1/test/echo", &small).await.status(), 200);
}

#[tokio::test]
async fn past_the_in_flight_limit_requests_get_503_with_retry_after() {
    let config = ServerConfig { in_flight_max: 1, ..ServerConfig::default() };
    let server = TestServer::start(config, Gateway::default()).await;
    let slow = tokio::spawn(client().get(server.url("/v1/test/slow?ms=1000&tag=overload")).send());
    slow_started("overload").await;
    let response = client().get(server.url("/v1/test/missing")).send().await.unwrap();
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let (status, code, _) = error_of(response).await;
    assert_eq!((status, code.as_str()), (503, "overloaded"));
    assert_eq!(slow.await.unwrap().unwrap().status(), 200, "the request in flight is served");
    assert_eq!(client().get(server.url("/healthz")).send().await.unwrap().status(), 200, "the slot is released");
}

const ALL: &str = "all-systems-token-0001";
const TEST_ONLY: &str = "test-only-token-000001";
const OTHER_ONLY: &str = "other-only-token-00001";

async fn server_with_tokens() -> TestServer {
    let tokens = [ALL.to_string(), format!("{TEST_ONLY}:test"), format!("{OTHER_ONLY}:other")];
    let tokens = tokens.iter().map(|t| ApiToken::parse(t).unwrap()).collect();
    TestServer::start(ServerConfig { tokens, ..ServerConfig::default() }, Gateway::default()).await
}

async fn status_with(server: &TestServer, path: &str, token: Option<&str>) -> (u16, String) {
    let mut request = client().post(server.url(path)).header("content-type", "application/json").body(r#"{"name":"a","count":1}"#);
    if !path.starts_with("/v1/test/echo") {
        request = client().get(server.url(path));
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    if status >= 400 {
        let (status, code, _) = error_of(response).await;
        return (status, code);
    }
    (status, String::new())
}

#[tokio::test]
async fn with_tokens_configured_a_request_without_one_is_401() {
    let server = server_with_tokens().await;
    assert_eq!(status_with(&server, "/v1/test/echo", None).await, (401, "unauthorized".into()));
    assert_eq!(status_with(&server, "/openapi.json", None).await, (401, "unauthorized".into()));
}

#[tokio::test]
async fn an_unknown_token_is_401() {
    let server = server_with_tokens().await;
    assert_eq!(status_with(&server, "/v1/test/echo", Some("not-a-known-token-at-all")).await, (401, "unauthorized".into()));
    // A known token's prefix is not the token.
    assert_eq!(status_with(&server, "/v1/test/echo", Some(&ALL[..10])).await, (401, "unauthorized".into()));
}

#[tokio::test]
async fn a_token_scoped_to_another_system_is_403_on_this_systems_prefix() {
    let server = server_with_tokens().await;
    assert_eq!(status_with(&server, "/v1/test/echo", Some(OTHER_ONLY)).await, (403, "forbidden".into()));
    assert_eq!(status_with(&server, "/v1/other/ping", Some(OTHER_ONLY)).await.0, 200);
    assert_eq!(status_with(&server, "/v1/test/echo", Some(TEST_ONLY)).await.0, 200);
    assert_eq!(status_with(&server, "/v1/other/ping", Some(TEST_ONLY)).await, (403, "forbidden".into()));
    assert_eq!(status_with(&server, "/v1/test/echo", Some(ALL)).await.0, 200);
    assert_eq!(status_with(&server, "/v1/other/ping", Some(ALL)).await.0, 200);
}

#[tokio::test]
async fn a_system_prefix_does_not_cover_a_longer_system_name() {
    // `/v1/test` belongs to `test`, `/v1/testing` to `testing`: a `test` token opens only the first.
    let server = server_with_tokens().await;
    assert_eq!(status_with(&server, "/v1/testing/ping", Some(TEST_ONLY)).await, (403, "forbidden".into()));
    assert_eq!(status_with(&server, "/v1/testing/ping", Some(ALL)).await.0, 200);
}

#[tokio::test]
async fn a_token_may_come_as_the_access_token_query_parameter() {
    let server = server_with_tokens().await;
    assert_eq!(status_with(&server, &format!("/v1/other/ping?access_token={OTHER_ONLY}"), None).await.0, 200);
    assert_eq!(status_with(&server, &format!("/v1/test/missing?x=1&access_token={OTHER_ONLY}"), None).await, (403, "forbidden".into()));
    assert_eq!(status_with(&server, "/v1/other/ping?access_token=wrong-token-0000000000", None).await, (401, "unauthorized".into()));
}

#[tokio::test]
async fn healthz_needs_no_token() {
    let server = server_with_tokens().await;
    let response = client().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok\n");
}

#[test]
fn listening_on_every_interface_without_tokens_is_refused() {
    let message = check_exposure("0.0.0.0:0".parse().unwrap(), &[]).unwrap_err();
    assert!(message.contains("refusing to listen on 0.0.0.0"), "{message}");
    assert!(check_exposure("[::]:7400".parse().unwrap(), &[]).is_err());
    assert!(check_exposure("127.0.0.1:0".parse().unwrap(), &[]).is_ok());
    assert!(check_exposure("[::1]:0".parse().unwrap(), &[]).is_ok());
    assert!(check_exposure("0.0.0.0:0".parse().unwrap(), &[ApiToken::parse(ALL).unwrap()]).is_ok());
}

#[tokio::test]
async fn the_openapi_document_lists_the_systems_paths_and_healthz() {
    let server = TestServer::default().await;
    let document: serde_json::Value = client().get(server.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let paths = document["paths"].as_object().expect("paths");
    for path in ["/healthz", "/v1/test/echo", "/v1/test/missing", "/v1/test/slow", "/v1/other/ping", "/v1/testing/ping"] {
        assert!(paths.contains_key(path), "{path} missing from {:?}", paths.keys().collect::<Vec<_>>());
    }
    assert!(paths["/v1/test/echo"]["post"].is_object());
    assert!(document["components"]["schemas"]["ErrorBody"].is_object(), "the error body is documented");
}

#[tokio::test]
async fn metrics_count_requests_by_route() {
    let server = TestServer::default().await;
    assert_eq!(post_json(&server, "/v1/test/echo", r#"{"name":"a","count":2}"#).await.status(), 200);
    assert_eq!(client().get(server.url("/v1/nowhere/at/all")).send().await.unwrap().status(), 404);
    let response = client().get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let line = |route: &str, status: &str| {
        text.lines().any(|l| {
            l.starts_with("tributary_http_requests_total{") && l.contains(&format!("route=\"{route}\"")) && l.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(line("/v1/test/echo", "200"), "{text}");
    // Unknown paths share one label, so scanning cannot blow up the series count.
    assert!(line("unmatched", "404"), "{text}");
    assert!(!text.contains("/v1/nowhere/at/all"), "{text}");
    assert!(text.contains("tributary_http_request_duration_seconds"), "{text}");
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_then_serve_returns() {
    let mut server = TestServer::default().await;
    let slow = tokio::spawn(client().get(server.url("/v1/test/slow?ms=500&tag=shutdown")).send());
    slow_started("shutdown").await;
    server.shut_down();
    let response = slow.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "slow done\n");
    let served = server.served.take().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), served).await.expect("serve returns after draining");
    result.unwrap().unwrap();
    assert!(client().get(server.url("/healthz")).send().await.is_err(), "no longer accepting");
}
