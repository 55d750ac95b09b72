//! The HTTP front for proxies that ask "may this request pass?" with a subrequest:
//! nginx `auth_request`, Traefik `forwardAuth`, Envoy's HTTP ext_authz mode.
//!
//! The original request is reconstructed from what the proxy forwards: nginx's
//! `X-Original-URL`/`X-Original-Method`, or the `X-Forwarded-Proto/Host/Uri/Method`
//! of Traefik and of the shipped Envoy HTTP config, or else the subrequest itself
//! with the front's path prefix removed (Envoy's HTTP ext_authz with `path_prefix`).
//! Those headers are trusted here — unlike on the gRPC path — so this listener must
//! be reachable only by the proxy. Each proxy sets only its own convention's headers
//! and passes the client's copies of the other's on, so `auth_request.original`
//! names the convention, and by default a subrequest with both is refused rather
//! than decided for a path the client chose. The decision is the same engine's: 200
//! carrying the headers to copy upstream (and to the client), or the denial as it is.
// Every Check's future is built here: keep it small (clippy.toml).
#![warn(clippy::large_futures)]
use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;

use crate::config::OriginalFrom;
use crate::decision::{Decision, Deny, is_safe_header_name, is_safe_header_value};
use crate::http::HttpState;
use crate::request::{Headers, Parts, Request};

/// Where the original request is, once reconstructed.
#[derive(Debug, PartialEq, Eq)]
struct Original {
    method: String,
    scheme: String,
    authority: String,
    request_uri: String,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// A subrequest that does not say which request it asks about: refused, and why.
fn unclear(status: u16, message: &'static str) -> Deny {
    Deny::message(status, message).because(message)
}

fn reconstruct(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    prefix: &str,
    from: OriginalFrom,
) -> Result<Original, Deny> {
    let host = header(headers, "host")
        .or(uri.host())
        .unwrap_or_default()
        .to_owned();
    let original_url = header(headers, "x-original-url");
    let forwarded_uri = header(headers, "x-forwarded-uri");
    let (original_url, forwarded_uri) = match from {
        OriginalFrom::Auto if original_url.is_some() && forwarded_uri.is_some() => {
            return Err(unclear(
                400,
                "the subrequest has both X-Original-URL and X-Forwarded-Uri, so one came \
                 from the client; set auth_request.original to the headers your proxy sets",
            ));
        }
        OriginalFrom::Auto => (original_url, forwarded_uri),
        OriginalFrom::XOriginalUrl if original_url.is_none() => {
            return Err(unclear(
                500,
                "auth_request.original is x-original-url but the proxy sent no X-Original-URL",
            ));
        }
        OriginalFrom::XOriginalUrl => (original_url, None),
        OriginalFrom::XForwarded if forwarded_uri.is_none() => {
            return Err(unclear(
                500,
                "auth_request.original is x-forwarded but the proxy sent no X-Forwarded-Uri",
            ));
        }
        OriginalFrom::XForwarded => (None, forwarded_uri),
    };
    if let Some(url) = original_url {
        let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        return Ok(Original {
            method: header(headers, "x-original-method")
                .unwrap_or(method.as_str())
                .to_owned(),
            scheme: scheme.to_owned(),
            authority: if authority.is_empty() {
                host
            } else {
                authority.to_owned()
            },
            request_uri: path.to_owned(),
        });
    }
    if let Some(fwd_uri) = forwarded_uri {
        return Ok(Original {
            method: header(headers, "x-forwarded-method")
                .unwrap_or(method.as_str())
                .to_owned(),
            scheme: header(headers, "x-forwarded-proto")
                .unwrap_or("http")
                .to_owned(),
            authority: header(headers, "x-forwarded-host")
                .map(str::to_owned)
                .unwrap_or(host),
            request_uri: fwd_uri.to_owned(),
        });
    }
    let full = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let rest = full.strip_prefix(prefix).unwrap_or(full);
    let request_uri = if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    };
    Ok(Original {
        method: method.as_str().to_owned(),
        scheme: header(headers, "x-forwarded-proto")
            .unwrap_or("http")
            .to_owned(),
        authority: host,
        request_uri,
    })
}

/// The client address: the proxy's `X-Real-IP`, the first `X-Forwarded-For` hop, or
/// the peer itself.
fn client_ip(headers: &HeaderMap, peer: SocketAddr) -> String {
    header(headers, "x-real-ip")
        .map(str::to_owned)
        .or_else(|| {
            header(headers, "x-forwarded-for")
                .and_then(|v| v.split(',').next())
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| peer.ip().to_string())
}

/// Lower-case (name, value) pairs; repeated headers are joined with `,` as Envoy
/// does, so plugins see one shape whichever front the request came through.
fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let Ok(value) = value.to_str() else { continue };
        match pairs.iter_mut().find(|(n, _)| n == name.as_str()) {
            Some((_, v)) => {
                v.push(',');
                v.push_str(value);
            }
            None => pairs.push((name.as_str().to_owned(), value.to_owned())),
        }
    }
    pairs
}

pub async fn handle(
    State(s): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let decision = match reconstruct(&method, &uri, &headers, &s.auth_path, s.original) {
        Ok(original) => {
            let pairs = header_pairs(&headers);
            let ip = client_ip(&headers, peer);
            let req = Request::assemble(Parts {
                method: &original.method,
                scheme: &original.scheme,
                authority: &original.authority,
                request_uri: &original.request_uri,
                headers: Headers::Pairs(&pairs),
                source_ip: Some(&ip),
                context_extensions: &[],
                body: &body,
                body_truncated: false,
                body_size: Some(body.len() as u64),
            });
            s.runtime.decide(&req, "http").await.decision
        }
        Err(refused) => {
            tracing::warn!(peer = %peer, "auth_request: {}", refused.reason);
            Decision::Deny(refused)
        }
    };
    let (status, out_headers, body) = match decision {
        Decision::Allow(allow) => {
            let mut out = allow.upstream_set;
            out.extend(allow.client_headers);
            // Envoy's HTTP ext_authz removes these from the upstream request; without
            // it a client's own X-Consumer-Username would reach the upstream.
            if !allow.upstream_remove.is_empty() {
                out.push((
                    "x-envoy-auth-headers-to-remove".into(),
                    allow.upstream_remove.join(","),
                ));
            }
            (StatusCode::OK, out, String::new())
        }
        Decision::Deny(deny) => (
            StatusCode::from_u16(deny.status).unwrap_or(StatusCode::FORBIDDEN),
            deny.headers,
            deny.body,
        ),
    };
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    for (name, value) in out_headers {
        if !is_safe_header_name(&name) || !is_safe_header_value(&value) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: OriginalFrom = OriginalFrom::Auto;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn nginx_original_url_wins() {
        let h = headers(&[
            ("host", "auth.local"),
            ("x-original-url", "https://app.example.com/a/b?x=1"),
            ("x-original-method", "POST"),
        ]);
        let o = reconstruct(&Method::GET, &"/auth".parse().unwrap(), &h, "/auth", AUTO).unwrap();
        assert_eq!(
            o,
            Original {
                method: "POST".into(),
                scheme: "https".into(),
                authority: "app.example.com".into(),
                request_uri: "/a/b?x=1".into()
            }
        );
    }

    #[test]
    fn traefik_forwarded_headers() {
        let h = headers(&[
            ("x-forwarded-method", "DELETE"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "app.example.com"),
            ("x-forwarded-uri", "/items/1?y=2"),
        ]);
        let o = reconstruct(&Method::GET, &"/auth".parse().unwrap(), &h, "/auth", AUTO).unwrap();
        assert_eq!(o.method, "DELETE");
        assert_eq!(o.authority, "app.example.com");
        assert_eq!(o.request_uri, "/items/1?y=2");
    }

    #[test]
    fn envoy_http_mode_strips_the_prefix() {
        let h = headers(&[("host", "app.example.com")]);
        let o = reconstruct(
            &Method::PUT,
            &"/auth/items/1?z=3".parse().unwrap(),
            &h,
            "/auth",
            AUTO,
        )
        .unwrap();
        assert_eq!(o.method, "PUT");
        assert_eq!(o.request_uri, "/items/1?z=3");
        let o = reconstruct(&Method::GET, &"/auth".parse().unwrap(), &h, "/auth", AUTO).unwrap();
        assert_eq!(o.request_uri, "/");
    }

    /// nginx sets X-Original-URL and passes a client's X-Forwarded-Uri on; Traefik sets
    /// X-Forwarded-Uri and passes a client's X-Original-URL on. Either way the client
    /// must not choose the path the decision is made for.
    #[test]
    fn a_client_cannot_pick_the_path_with_the_other_proxys_header() {
        let auth: Uri = "/auth".parse().unwrap();
        let both = headers(&[
            ("x-original-url", "https://app.example.com/public"),
            ("x-forwarded-uri", "/admin"),
            ("x-forwarded-host", "app.example.com"),
        ]);
        let err = reconstruct(&Method::GET, &auth, &both, "/auth", AUTO).unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.body.contains("auth_request.original"), "{}", err.body);

        // Named, each proxy's own headers are read and the others ignored.
        let nginx = reconstruct(
            &Method::GET,
            &auth,
            &both,
            "/auth",
            OriginalFrom::XOriginalUrl,
        );
        assert_eq!(nginx.unwrap().request_uri, "/public");
        let traefik = reconstruct(
            &Method::GET,
            &auth,
            &both,
            "/auth",
            OriginalFrom::XForwarded,
        );
        assert_eq!(traefik.unwrap().request_uri, "/admin");

        // A named convention whose header is missing is the proxy's misconfiguration,
        // never a decision about the subrequest's own path.
        let none = headers(&[("host", "app.example.com")]);
        for from in [OriginalFrom::XOriginalUrl, OriginalFrom::XForwarded] {
            let err = reconstruct(&Method::GET, &auth, &none, "/auth", from).unwrap_err();
            assert_eq!(err.status, 500, "{from:?}");
        }
        // With only X-Original-Method from the client, Traefik's headers decide.
        let traefik_only = headers(&[
            ("x-original-method", "DELETE"),
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/items"),
        ]);
        let o = reconstruct(&Method::GET, &auth, &traefik_only, "/auth", AUTO).unwrap();
        assert_eq!(
            (o.method.as_str(), o.request_uri.as_str()),
            ("GET", "/items")
        );
    }

    #[test]
    fn duplicate_headers_join_like_envoy() {
        let mut h = HeaderMap::new();
        h.append("authorization", HeaderValue::from_static("Bearer a"));
        h.append("authorization", HeaderValue::from_static("Bearer b"));
        assert_eq!(
            header_pairs(&h),
            vec![("authorization".to_string(), "Bearer a,Bearer b".to_string())]
        );
    }

    #[test]
    fn client_ip_prefers_the_proxy_headers() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            client_ip(&headers(&[("x-forwarded-for", "1.2.3.4, 5.6.7.8")]), peer),
            "1.2.3.4"
        );
        assert_eq!(
            client_ip(&headers(&[("x-real-ip", "9.9.9.9")]), peer),
            "9.9.9.9"
        );
        assert_eq!(client_ip(&HeaderMap::new(), peer), "127.0.0.1");
    }
}
