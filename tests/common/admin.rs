//! A thin client for portcullis's APISIX-compatible Admin API: every call returns the
//! status and the JSON answer, so tests compare them with the APISIX docs directly.
use reqwest::Method;
use serde_json::Value;

use super::http_client;

#[derive(Clone)]
pub struct Admin {
    base: String,
    key: Option<String>,
    client: reqwest::Client,
}

impl Admin {
    pub fn new(base: String, key: Option<&str>) -> Self {
        Admin {
            base,
            key: key.map(str::to_owned),
            client: http_client(),
        }
    }

    /// The same client with another key (`None`: no `X-API-KEY` header at all).
    pub fn with_key(&self, key: Option<&str>) -> Self {
        Admin {
            key: key.map(str::to_owned),
            ..self.clone()
        }
    }

    /// `path` is either absolute (`/apisix/admin/routes/1`) or relative to
    /// `/apisix/admin/` (`routes/1`).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{path}", self.base)
        } else {
            format!("{}/apisix/admin/{path}", self.base)
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(Method::GET, path, None).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(Method::DELETE, path, None).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(Method::PUT, path, Some(body.to_string())).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(Method::POST, path, Some(body.to_string())).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(Method::PATCH, path, Some(body.to_string())).await
    }

    /// Any method with a raw body (malformed JSON tests). A non-JSON answer comes back
    /// as a JSON string.
    pub async fn send(&self, method: Method, path: &str, body: Option<String>) -> (u16, Value) {
        let (status, _, value) = self.send_full(method, path, body).await;
        (status, value)
    }

    /// As [`Admin::send`], with the response headers.
    pub async fn send_full(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let url = self.url(path);
        let mut req = self.client.request(method.clone(), &url);
        if let Some(key) = &self.key {
            req = req.header("X-API-KEY", key);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {url} body: {e}"));
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, value)
    }
}
