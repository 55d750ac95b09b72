//! The Admin API, shaped like APISIX 3.x's so existing scripts and `curl` lines
//! keep working: same paths, `X-API-KEY`, `{"key","value"}` answers, list pages,
//! `error_msg` bodies, and `X-API-VERSION: v3` on every answer.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::store::{ListKind, ResourceId, Store, WriteError};

#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<Store>,
    pub api_key: Arc<str>,
}

pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route(
            "/routes",
            get(list_routes).post(post_route).put(put_route_body),
        )
        .route(
            "/routes/{id}",
            get(get_route)
                .put(put_route)
                .patch(patch_route)
                .delete(delete_route),
        )
        .route("/consumers", get(list_consumers).put(put_consumer_body))
        .route(
            "/consumers/{username}",
            get(get_consumer)
                .put(put_consumer)
                .patch(patch_consumer)
                .delete(delete_consumer),
        )
        .route(
            "/consumers/{username}/credentials",
            get(list_credentials).put(put_credential_body),
        )
        .route(
            "/consumers/{username}/credentials/{id}",
            get(get_credential)
                .put(put_credential)
                .patch(patch_credential)
                .delete(delete_credential),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
        .with_state(state);
    Router::new()
        .nest("/apisix/admin", api)
        .layer(middleware::map_response(|mut r: Response| async move {
            r.headers_mut()
                .insert("x-api-version", HeaderValue::from_static("v3"));
            r
        }))
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error_msg": msg }))).into_response()
}

/// Constant-time comparison: the key check must not leak how much of a guess matched.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn require_key(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get("x-api-key")
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    if !same_key(given, s.api_key.as_bytes()) {
        return error(StatusCode::UNAUTHORIZED, "failed to check token");
    }
    next.run(req).await
}

fn write_error(e: WriteError) -> Response {
    match e {
        WriteError::Invalid(msg) => error(StatusCode::BAD_REQUEST, &msg),
        WriteError::NotFound(msg) if msg == "consumer not found" => {
            error(StatusCode::BAD_REQUEST, &msg)
        }
        WriteError::NotFound(msg) => {
            (StatusCode::NOT_FOUND, Json(json!({ "message": msg }))).into_response()
        }
        WriteError::Persist { .. } => {
            tracing::error!(error = %e, "Admin API write not persisted");
            error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
    }
}

/// A refused request: small enough to pass around in `Result`s.
struct Reject(StatusCode, String);

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        error(self.0, &self.1)
    }
}

fn body_json(body: &Bytes) -> Result<Value, Reject> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(Reject(
            StatusCode::BAD_REQUEST,
            "invalid request body: expected a JSON object".into(),
        )),
        Err(e) => Err(Reject(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )),
    }
}

async fn put(store: &Store, id: ResourceId, body: Value) -> Response {
    let key = id.key();
    match store.put(id, body).await {
        Ok((created, value)) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            tracing::info!(key = %key, created, "Admin API write");
            metrics::counter!("portcullis_admin_writes_total", "op" => "put").increment(1);
            (status, Json(json!({ "key": key, "value": value }))).into_response()
        }
        Err(e) => write_error(e),
    }
}

async fn get_one(store: &Store, id: ResourceId) -> Response {
    match store.get(&id).await {
        Some((value, created, modified)) => Json(json!({
            "key": id.key(), "value": value, "createdIndex": created, "modifiedIndex": modified
        }))
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "message": "Key not found" })),
        )
            .into_response(),
    }
}

async fn delete(store: &Store, id: ResourceId) -> Response {
    match store.delete(&id).await {
        Ok(()) => {
            tracing::info!(key = %id.key(), "Admin API delete");
            metrics::counter!("portcullis_admin_writes_total", "op" => "delete").increment(1);
            Json(json!({ "deleted": "1", "key": id.key() })).into_response()
        }
        Err(e) => write_error(e),
    }
}

/// RFC 7396 JSON merge patch, as APISIX's PATCH applies it.
fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let map = target.as_object_mut().expect("made an object above");
            for (k, v) in patch {
                if v.is_null() {
                    map.remove(&k);
                } else {
                    merge_patch(map.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other,
    }
}

async fn patch(store: &Store, id: ResourceId, body: Bytes) -> Response {
    let patch = match body_json(&body) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let Some((mut current, _, _)) = store.get(&id).await else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "message": "Key not found" })),
        )
            .into_response();
    };
    merge_patch(&mut current, patch);
    if let Value::Object(map) = &mut current {
        map.remove("create_time");
        map.remove("update_time");
    }
    put(store, id, current).await
}

#[derive(Deserialize)]
struct Page {
    page: Option<usize>,
    page_size: Option<usize>,
}

async fn list(store: &Store, kind: ListKind<'_>, page: Page) -> Response {
    let all = store.list(kind).await;
    let total = all.len();
    let items: Vec<Value> = all
        .into_iter()
        .map(|(id, value, created, modified)| {
            json!({ "key": id.key(), "value": value, "createdIndex": created, "modifiedIndex": modified })
        })
        .collect();
    let items = match (page.page, page.page_size) {
        (None, None) => items,
        (p, size) => {
            let size = size.unwrap_or(10).clamp(10, 500);
            let p = p.unwrap_or(1).max(1);
            items.into_iter().skip((p - 1) * size).take(size).collect()
        }
    };
    Json(json!({ "total": total, "list": items })).into_response()
}

/// An id given both in the path and the body must agree.
fn id_from(path: Option<&str>, body: &mut Value, field: &str) -> Result<String, Reject> {
    let in_body = body.get(field).and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    let id = match (path, in_body) {
        (Some(p), Some(b)) if p != b => {
            return Err(Reject(
                StatusCode::BAD_REQUEST,
                format!("wrong {field} in the body: {b:?} does not match {p:?} in the path"),
            ));
        }
        (Some(p), _) => p.to_owned(),
        (None, Some(b)) => b,
        (None, None) => return Err(Reject(StatusCode::BAD_REQUEST, format!("missing {field}"))),
    };
    let valid = if field == "username" {
        crate::resources::valid_username(&id)
    } else {
        crate::resources::valid_id(&id)
    };
    if !valid {
        return Err(Reject(
            StatusCode::BAD_REQUEST,
            format!("invalid configuration: {field}: {id:?} is not a valid {field}"),
        ));
    }
    if let Value::Object(map) = body {
        map.insert(field.to_owned(), Value::String(id.clone()));
    }
    Ok(id)
}

async fn list_routes(State(s): State<AdminState>, Query(p): Query<Page>) -> Response {
    list(&s.store, ListKind::Routes, p).await
}

async fn get_route(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    get_one(&s.store, ResourceId::Route(id)).await
}

async fn put_route_with(s: &AdminState, path_id: Option<&str>, body: Bytes) -> Response {
    let mut body = match body_json(&body) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    match id_from(path_id, &mut body, "id") {
        Ok(id) => put(&s.store, ResourceId::Route(id), body).await,
        Err(r) => r.into_response(),
    }
}

async fn put_route(State(s): State<AdminState>, Path(id): Path<String>, body: Bytes) -> Response {
    put_route_with(&s, Some(&id), body).await
}

async fn put_route_body(State(s): State<AdminState>, body: Bytes) -> Response {
    put_route_with(&s, None, body).await
}

/// POST creates a route under a new id, as APISIX does: ordered, unique ids.
async fn post_route(State(s): State<AdminState>, body: Bytes) -> Response {
    let mut body = match body_json(&body) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    if body.get("id").is_some() {
        return error(StatusCode::BAD_REQUEST, "wrong route id, do not need it");
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let id = format!("{nanos:020}");
    if let Value::Object(map) = &mut body {
        map.insert("id".into(), Value::String(id.clone()));
    }
    put(&s.store, ResourceId::Route(id), body).await
}

async fn patch_route(State(s): State<AdminState>, Path(id): Path<String>, body: Bytes) -> Response {
    patch(&s.store, ResourceId::Route(id), body).await
}

async fn delete_route(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    delete(&s.store, ResourceId::Route(id)).await
}

async fn list_consumers(State(s): State<AdminState>, Query(p): Query<Page>) -> Response {
    list(&s.store, ListKind::Consumers, p).await
}

async fn get_consumer(State(s): State<AdminState>, Path(u): Path<String>) -> Response {
    get_one(&s.store, ResourceId::Consumer(u)).await
}

async fn put_consumer_with(s: &AdminState, path: Option<&str>, body: Bytes) -> Response {
    let mut body = match body_json(&body) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    match id_from(path, &mut body, "username") {
        Ok(u) => put(&s.store, ResourceId::Consumer(u), body).await,
        Err(r) => r.into_response(),
    }
}

async fn put_consumer(State(s): State<AdminState>, Path(u): Path<String>, body: Bytes) -> Response {
    put_consumer_with(&s, Some(&u), body).await
}

async fn put_consumer_body(State(s): State<AdminState>, body: Bytes) -> Response {
    put_consumer_with(&s, None, body).await
}

async fn patch_consumer(
    State(s): State<AdminState>,
    Path(u): Path<String>,
    body: Bytes,
) -> Response {
    patch(&s.store, ResourceId::Consumer(u), body).await
}

async fn delete_consumer(State(s): State<AdminState>, Path(u): Path<String>) -> Response {
    delete(&s.store, ResourceId::Consumer(u)).await
}

async fn list_credentials(
    State(s): State<AdminState>,
    Path(u): Path<String>,
    Query(p): Query<Page>,
) -> Response {
    if !s.store.consumer_exists(&u).await {
        return error(StatusCode::BAD_REQUEST, "consumer not found");
    }
    list(&s.store, ListKind::Credentials(&u), p).await
}

async fn get_credential(
    State(s): State<AdminState>,
    Path((u, id)): Path<(String, String)>,
) -> Response {
    get_one(&s.store, ResourceId::Credential(u, id)).await
}

async fn put_credential_with(
    s: &AdminState,
    u: String,
    path_id: Option<&str>,
    body: Bytes,
) -> Response {
    let mut body = match body_json(&body) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    match id_from(path_id, &mut body, "id") {
        Ok(id) => put(&s.store, ResourceId::Credential(u, id), body).await,
        Err(r) => r.into_response(),
    }
}

async fn put_credential(
    State(s): State<AdminState>,
    Path((u, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    put_credential_with(&s, u, Some(&id), body).await
}

/// `PUT /consumers/{username}/credentials` with the id in the body.
async fn put_credential_body(
    State(s): State<AdminState>,
    Path(u): Path<String>,
    body: Bytes,
) -> Response {
    put_credential_with(&s, u, None, body).await
}

async fn patch_credential(
    State(s): State<AdminState>,
    Path((u, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    patch(&s.store, ResourceId::Credential(u, id), body).await
}

async fn delete_credential(
    State(s): State<AdminState>,
    Path((u, id)): Path<(String, String)>,
) -> Response {
    delete(&s.store, ResourceId::Credential(u, id)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut v = json!({"uri": "/a", "plugins": {"jwt-auth": {"x": 1}, "limit-count": {}}});
        merge_patch(
            &mut v,
            json!({"uri": "/b", "plugins": {"limit-count": null}}),
        );
        assert_eq!(v, json!({"uri": "/b", "plugins": {"jwt-auth": {"x": 1}}}));
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same_key(b"abc", b"abc"));
        assert!(!same_key(b"abc", b"abd"));
        assert!(!same_key(b"", b"abc"));
    }
}
